"""The sidecar end to end: one service address, answered by stable or canary by color.

One topology and one sidecar (pod color ``stable``) serve the whole module;
the sidecar's policy routes ``canary`` through table 102 in the node and gives
``blue`` a mark but no table. Each request is what an app sends through
HTTP_PROXY, from the pod namespace.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.demo import run as demo
from sidecar.demo.topology import CLUSTER_ROLES
from tests.e2e import (
    kernel_packets,
    netns_exists,
    node_state,
    request,
    require_kernel,
    start_sidecar,
    status_json,
    world,
)

STABLE, CANARY = demo.STABLE_HOST, demo.CANARY_HOST


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(topology, sidecar) for the module; both torn down even when a test fails."""
    require_kernel()
    with world() as topo:
        sc = start_sidecar(topo, tmp_path_factory.mktemp("e2e"))
        try:
            yield topo, sc
        finally:
            sc.stop()


def _settle() -> None:
    """Let delayed ACKs of earlier requests cross the classifier before counting."""
    time.sleep(0.3)


@pytest.mark.root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize(
    ("sent", "color", "host"),
    [
        (None, "stable", STABLE),  # no header: the pod's color, main table
        ("canary", "canary", CANARY),  # a routed color: table 102
        ("stable", "stable", STABLE),
    ],
)
def test_same_address_answered_by_color(running, family, sent, color, host):
    topo, _ = running
    answer = request(topo, family, sent)
    assert (answer.status, answer.color, answer.host) == (200, color, host), answer


@pytest.mark.root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_color_without_a_table_falls_back_to_main(running, family):
    topo, sc = running
    _settle()
    before = kernel_packets(sc, color="blue", hook="ingress")
    answer = request(topo, family, "blue")
    assert (answer.status, answer.color, answer.host) == (200, "blue", STABLE), answer
    # It was marked (the classifier saw a blue flow), and still took the stable path.
    assert kernel_packets(sc, color="blue", hook="ingress") > before


@pytest.mark.root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_unknown_color_header_is_replaced_by_the_pods(running, family):
    topo, _ = running
    answer = request(topo, family, "purple")
    assert (answer.status, answer.color, answer.host) == (200, "stable", STABLE), answer


@pytest.mark.root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_traffic_that_bypasses_the_sidecar_is_untouched(running, family):
    topo, sc = running
    _settle()
    before = kernel_packets(sc)
    # The app claims canary in its header, but the kernel never heard of this flow.
    answer = request(topo, family, "canary", via_sidecar=False)
    _settle()
    assert (answer.status, answer.color, answer.host) == (200, "canary", STABLE), answer
    assert kernel_packets(sc) == before, "the classifier counted a flow it does not own"


@pytest.mark.root
def test_counters_move_per_color(running):
    topo, sc = running
    n = 5
    _settle()
    before_pkts = kernel_packets(sc, color="canary", hook="ingress")
    before_stable = kernel_packets(sc, color="stable", hook="ingress")
    status, text = sc.get("/metrics")
    before_reqs = demo.metric_value(
        text, "traffic_color_requests_total", {"direction": "outbound", "color": "canary"}
    )
    for i in range(n):
        answer = request(topo, ("ipv4", "ipv6")[i % 2], "canary")
        assert answer.host == CANARY, answer
    _settle()
    status, text = sc.get("/metrics")
    assert status == 200
    after_reqs = demo.metric_value(
        text, "traffic_color_requests_total", {"direction": "outbound", "color": "canary"}
    )
    assert after_reqs - before_reqs == n
    # At least one packet per request (the request itself) entered the node marked canary.
    assert kernel_packets(sc, color="canary", hook="ingress") - before_pkts >= n
    assert kernel_packets(sc, color="stable", hook="ingress") == before_stable


@pytest.mark.root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_parked_idle_flow_keeps_its_color_in_the_kernel(running, family):
    """Idle pooled flows park (transport closed, socket kept) and come back marked.

    Were the flow's kernel entry lost while parked, its packets would go unmarked
    and the canary request below would reach the stable host.
    """
    topo, sc = running
    assert request(topo, family, "canary").host == CANARY
    deadline = time.monotonic() + 10
    while True:
        st = status_json(sc)
        if st["parked_flows"] == sum(st["open_flows"].values()):
            break  # every idle flow, this canary one included, is parked
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    before_pkts = kernel_packets(sc, color="canary", hook="ingress")
    answer = request(topo, family, "canary")
    assert (answer.status, answer.color, answer.host) == (200, "canary", CANARY), answer
    after = status_json(sc)
    # The same flow served it: no new one opened, none added to the kernel's map.
    assert after["open_flows"] == st["open_flows"]
    assert after["datapath"]["flows"]["in_map"] == st["datapath"]["flows"]["in_map"]
    assert after["parked_flows"] == st["parked_flows"] - 1
    assert kernel_packets(sc, color="canary", hook="ingress") > before_pkts


@pytest.mark.root
def test_node_holds_one_rule_per_family_and_the_canary_table(running):
    topo, _ = running
    state = node_state(topo)
    assert [f["options"]["bpf_name"] for f in state.filters["ingress"]] == ["traffic-color:ingress"]
    assert state.filters["egress"] == []
    want = {"ipv4": ("198.18.100.10", demo.CANARY_V4), "ipv6": ("fd00:96::10", demo.CANARY_V6)}
    for fam in ("ipv4", "ipv6"):
        rules = [(r["fwmark"], r.get("fwmask"), str(r["table"])) for r in state.rules[fam]]
        assert rules == [("0x2", "0xff", str(demo.CANARY_TABLE))], state.rules[fam]
        routes = [(r["dst"], r.get("gateway")) for r in state.routes[fam]]
        assert routes == [want[fam]], state.routes[fam]


@pytest.mark.root
def test_bcc_is_not_loaded_in_the_long_lived_process(running):
    _, sc = running
    status = status_json(sc)
    assert status["datapath"]["attached"] is True, status["datapath"]
    assert status["process"]["bcc_imported"] is False
    assert status["process"]["llvm_mapped"] is False
    # The same, read from outside: ``ip netns exec`` execs, so the pid is the sidecar's.
    pid = sc.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"sidecar" in cmdline and b"run" in cmdline, cmdline
    assert status["process"]["pid"] == pid
    assert demo.mapped_libraries(pid, ("libc.so", "libc-")), "cannot read the process's maps"
    assert demo.mapped_libraries(pid) == []


@pytest.mark.root
def test_make_demo_runs_end_to_end_and_cleans_up():
    """``python -m sidecar demo`` as a user runs it: pods, a node agent, exit 0, nothing left."""
    require_kernel()
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "demo OK" in out
    assert "cleanup: no filters, rules or routes left" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("poda ", "podb "))]
    answered = {(r[0], r[1], r[2], r[3], r[5]) for r in rows}
    for family in ("IPv4", "IPv6"):
        assert ("podb", "sidecar", family, "(none)", CANARY) in answered, "the canary pod"
        assert ("poda", "sidecar", family, "(none)", STABLE) in answered
        assert ("poda", "sidecar", family, "canary", CANARY) in answered, "the request's color"
        assert ("podb", "bypass", family, "canary", STABLE) in answered, "no sidecar, no DSCP"
    assert 'traffic_color_node_packets_total{color="canary",interface="veth-b"}' in out
    assert "podb: pid" in out and "CapEff 0000000000000000" in out
    tag = next(w for w in out.split() if w.startswith("tcdemo-")).rstrip(":")
    assert not any(netns_exists(f"{tag}-{role}") for role in CLUSTER_ROLES)


@pytest.mark.root
def test_demo_router_keeps_the_sidecar_reaching_into_a_router_namespace():
    """``demo --router``: the arrangement for routers outside Kubernetes stays available."""
    require_kernel()
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--router"],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "demo OK" in out
    assert "cleanup: no filters, rules or routes left" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("sidecar", "bypass"))]
    answered = {(r[1], r[2], r[4]) for r in rows if r[1:2] in (["IPv4"], ["IPv6"])}
    assert ("IPv4", "canary", CANARY) in answered and ("IPv6", "canary", CANARY) in answered
    assert ("IPv6", "(none)", STABLE) in answered
    tag = next(w for w in out.split() if w.startswith("tcdemo-")).rstrip(":")
    assert not any(netns_exists(f"{tag}-{role}") for role in ("pod", "node", "stable", "canary"))


def test_loopback_demo_colors_headers_without_the_kernel():
    """The fallback ``make demo`` shows where there is no root or BCC: no root needed here."""
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.demo.run", "--loopback"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip().startswith("sidecar ")]
    given = {r[2]: r[3] for r in rows if r[1:2] == ["IPv4"]}
    assert given == {"(none)": "stable", "canary": "canary", "blue": "blue", "purple": "stable"}
    assert 'traffic_color_requests_total{code="200",color="canary",direction="outbound"} 1.0' in (
        proc.stdout
    )
