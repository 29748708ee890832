"""Who may use the admin endpoints that do work or show internals. Pure: no sockets.

``/status`` names every listener, color and kernel object, ``/debug/route``
runs a route lookup per call, and ``/quitquitquit`` stops the sidecar: from a
pod's own containers (loopback) they are the operator's tools, from the
network they are an information leak and a kill switch. The admin port must
still listen on every address because the kubelet probes ``/readyz`` and
Prometheus scrapes ``/metrics`` from outside the pod, so the gate is per path,
not per listener (as Envoy's admin and Linkerd's ``/shutdown`` are loopback-only).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

# Paths any peer may use: the kubelet's probes and Prometheus.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_allowed(peer: str | None, trusted: Iterable[Network]) -> bool:
    """Loopback always; any other peer only when a ``trusted`` network holds it."""
    if not peer:
        return False  # a Unix socket or an unknown peer: nothing to judge by, refuse
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return True
    return any(addr.version == net.version and addr in net for net in trusted)


def path_open(path: str) -> bool:
    """Whether ``path`` answers every peer (probes and metrics) or only trusted ones."""
    return path in OPEN_PATHS
