"""What the sidecar leaves in the kernel when it stops: nothing on SIGTERM, and after a
SIGKILL, leftovers that the next start replaces rather than duplicates.

Each test builds its own namespaces, so a failure leaves no state for the next.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest

from sidecar.demo import run as demo
from sidecar.demo.topology import CLUSTER_ROLES, Topology, pid_alive, stop_process
from tests.e2e import (
    kernel_packets,
    netns_exists,
    node_state,
    request,
    require_kernel,
    start_sidecar,
    world,
)

pytestmark = pytest.mark.root


@pytest.fixture
def topo():
    require_kernel()
    with world("tce2ec") as t:
        yield t


def test_sigterm_removes_every_kernel_object(topo, tmp_path):
    pins_before = demo.bpffs_entries()
    sc = start_sidecar(topo, tmp_path)
    try:
        assert request(topo, "ipv4", "canary").host == demo.CANARY_HOST
        assert request(topo, "ipv6", "canary").host == demo.CANARY_HOST
        running = node_state(topo)
        # The check below must be able to fail: the objects exist while it runs.
        assert running.filters["ingress"] and running.rules["ipv4"] and running.rules["ipv6"]
        assert running.routes["ipv4"] and running.routes["ipv6"]
    finally:
        code = sc.stop()
    assert code == 0, sc.log_tail()
    state = node_state(topo)
    assert state.empty, state
    assert demo.bpffs_entries() - pins_before == set()
    # With the classifier gone, canary's header no longer changes the path.
    answer = request(topo, "ipv4", "canary", via_sidecar=False)
    assert answer.host == demo.STABLE_HOST


def test_restart_after_sigkill_replaces_leftovers(topo, tmp_path):
    first = start_sidecar(topo, tmp_path, name="first")
    assert request(topo, "ipv4", "canary").host == demo.CANARY_HOST
    assert stop_process(first.proc, signal.SIGKILL) == -signal.SIGKILL
    first.exit_code = -signal.SIGKILL
    left = node_state(topo)
    # SIGKILL gives no chance to clean up: what it left is what the restart must deal with.
    assert len(left.filters["ingress"]) == 1 and left.rules["ipv4"] and left.rules["ipv6"]

    second = start_sidecar(topo, tmp_path, name="second")
    try:
        state = node_state(topo)
        assert len(state.filters["ingress"]) == 1, state.filters
        assert state.filters["egress"] == []
        for fam in ("ipv4", "ipv6"):
            assert len(state.rules[fam]) == 1, state.rules[fam]
            assert len(state.routes[fam]) == 1, state.routes[fam]
        # The new classifier (not the orphaned one) is the one doing the work.
        for fam in ("ipv4", "ipv6"):
            answer = request(topo, fam, "canary")
            assert (answer.color, answer.host) == ("canary", demo.CANARY_HOST), answer
        assert kernel_packets(second, color="canary", hook="ingress") > 0
    finally:
        code = second.stop()
    assert code == 0, second.log_tail()
    assert node_state(topo).empty, node_state(topo)


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Output of ``proc`` up to the line holding ``needle`` (bounded in time)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {needle!r} within {timeout:g}s:\n{out.decode()}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            out += os.read(fd, 65536)
    return out.decode()


def test_demo_ctrl_c_tears_everything_down():
    """Ctrl-C while ``demo --keep`` holds the topology up: sidecar stopped, namespaces gone."""
    require_kernel()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--keep"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out = _read_until(proc, "press Enter", 60)
        tag = next(w for w in out.split() if w.startswith("tcdemo-")).rstrip(":")
        names = [f"{tag}-{role}" for role in CLUSTER_ROLES]
        assert all(netns_exists(n) for n in names)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        stop_process(proc, signal.SIGKILL, 5)
    text = out + rest.decode()
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert not any(netns_exists(n) for n in names), text


def test_a_new_topology_removes_namespaces_left_by_a_dead_run():
    """A run killed with SIGKILL leaves namespaces; the next run with its prefix removes them."""
    require_kernel()
    dead = 4_000_000  # above any pid a run of ours could have had here
    while pid_alive(dead):
        dead += 1
    # A prefix of this run's own: runs side by side must not remove each other's "stale" one.
    prefix = f"tce2es{secrets.token_hex(3)}"
    stale = f"{prefix}-{dead}-{secrets.token_hex(2)}-node"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    sleeper = subprocess.Popen(
        ["ip", "netns", "exec", stale, "sleep", "60"], start_new_session=True
    )
    try:
        with Topology(prefix) as topo:
            assert not netns_exists(stale)
            assert sleeper.wait(10) == -signal.SIGKILL  # what ran inside was stopped too
            assert all(netns_exists(n) for n in topo.names.values())
        assert topo.leftovers() == []
    finally:
        stop_process(sleeper, signal.SIGKILL, 5)
        subprocess.run(["ip", "netns", "del", stale], check=False, timeout=10, capture_output=True)
