"""End-to-end tests: the whole sidecar as a process, in the demo's namespaces.

Helpers shared by ``test_e2e.py`` and ``test_cleanup.py``. The kernel state is
read back with the ``ip`` and ``tc`` tools in JSON, independently of the
sidecar's own view of it, because these tests check what the kernel holds.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.demo import run as demo
from sidecar.demo.topology import NODE_POD_IFACE, SERVICE_V4, SERVICE_V6, Topology
from tests.conftest import IN_CI, require_root

URL_V4 = f"http://{SERVICE_V4}/"
URL_V6 = f"http://[{SERVICE_V6}]/"
URLS = {"ipv4": URL_V4, "ipv6": URL_V6}
PROXY = ("127.0.0.1", demo.OUTBOUND_PORT)


def require_kernel() -> None:
    """Root plus what the classifier needs; skip on a laptop, fail under CI."""
    require_root()
    why = demo.kernel_unavailable_reason()
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run the kernel end-to-end tests: {why}")
    pytest.skip(why)


@contextlib.contextmanager
def world(prefix: str = "tce2e") -> Iterator[Topology]:
    """The four namespaces with a backend in stable and canary, answering on both families."""
    with Topology(prefix) as topo:
        for role, name in (("stable", demo.STABLE_HOST), ("canary", demo.CANARY_HOST)):
            topo.spawn(
                role,
                [sys.executable, "-m", "sidecar.demo.backend", "--name", name],
                stdout=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        demo.wait_for_backends(demo.Place(topo.pod), [URL_V4, URL_V6])
        yield topo


def start_sidecar(
    topo: Topology,
    tmp: Path,
    color: str = "stable",
    policy_text: str | None = None,
    name: str = "sidecar",
) -> demo.SidecarProcess:
    """Run ``python -m sidecar run`` in the pod and wait (bounded) until ``/readyz`` is 200."""
    policy = tmp / f"{name}-policy.yaml"
    policy.write_text(
        policy_text if policy_text is not None else demo.kernel_policy(topo.path("node"))
    )
    sc = demo.start_sidecar(
        lambda argv, **kw: topo.spawn("pod", argv, **kw),
        policy,
        color,
        tmp / f"{name}.log",
        demo.Place(topo.pod),
        ("127.0.0.1", demo.ADMIN_PORT),
    )
    try:
        sc.wait_ready()
    except BaseException:
        sc.stop()
        raise
    return sc


def request(
    topo: Topology,
    family: str,
    color: str | None,
    via_sidecar: bool = True,
) -> demo.Answer:
    """One GET to the service address from the pod, as the app would send it."""
    return topo.call("pod", demo.fetch, URLS[family], PROXY if via_sidecar else None, color)


# ------------------------------------------------------------------ kernel state, as JSON


def _json(topo: Topology, argv: list[str]) -> list[dict]:
    proc = topo.exec("node", argv, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []  # e.g. "FIB table does not exist": nothing there
    return json.loads(proc.stdout)


@dataclass(frozen=True)
class NodeState:
    """What the node namespace holds that the sidecar may have put there."""

    filters: dict[str, list[dict]]  # hook -> bpf filters on to-pod
    rules: dict[str, list[dict]]  # family -> fwmark rules
    routes: dict[str, list[dict]]  # family -> routes in the canary table

    @property
    def empty(self) -> bool:
        return not any([*self.filters.values(), *self.rules.values(), *self.routes.values()])


def node_state(topo: Topology, table: int = demo.CANARY_TABLE) -> NodeState:
    filters = {}
    for hook in ("ingress", "egress"):
        dump = _json(topo, ["tc", "-j", "filter", "show", "dev", NODE_POD_IFACE, hook])
        # tc prints a header entry per pref and one with "options" per filter.
        filters[hook] = [f for f in dump if f.get("kind") == "bpf" and "options" in f]
    rules, routes = {}, {}
    for fam, flag in (("ipv4", "-4"), ("ipv6", "-6")):
        rules[fam] = [r for r in _json(topo, ["ip", "-j", flag, "rule", "show"]) if "fwmark" in r]
        routes[fam] = _json(topo, ["ip", "-j", flag, "route", "show", "table", str(table)])
    return NodeState(filters, rules, routes)


def kernel_packets(sc: demo.SidecarProcess, **labels: str) -> float:
    status, text = sc.get("/metrics")
    assert status == 200, text
    return demo.metric_value(text, "traffic_color_kernel_packets_total", labels)


def status_json(sc: demo.SidecarProcess) -> dict:
    status, text = sc.get("/status")
    assert status == 200, text
    return json.loads(text)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")
