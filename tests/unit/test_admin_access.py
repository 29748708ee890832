"""Which peers may use the admin endpoints that do work or show internals."""

from __future__ import annotations

import ipaddress

from sidecar.admin.access import path_open, peer_allowed


def test_loopback_always_others_only_when_trusted() -> None:
    for peer in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
        assert peer_allowed(peer, ()), peer
    for peer in ("198.18.61.2", "10.0.0.5", "fd00::1", "::ffff:10.0.0.5", "", None, "x"):
        assert not peer_allowed(peer, ()), peer
    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    assert peer_allowed("10.0.0.5", nets) and peer_allowed("::ffff:10.0.0.5", nets)
    assert not peer_allowed("11.0.0.5", nets) and not peer_allowed("fd00::1", nets)


def test_probes_and_metrics_are_open_everything_else_gated() -> None:
    assert all(path_open(p) for p in ("/healthz", "/readyz", "/metrics"))
    assert not any(path_open(p) for p in ("/status", "/debug/route", "/quitquitquit", "/x"))
