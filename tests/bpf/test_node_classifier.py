"""The node classifier's decisions (bpf/node.c), read back through BPF_PROG_TEST_RUN.

Table rows as in test_classifier.py: a description, the packet, the mark it
enters with, and what must come out: the verdict, ``skb->mark`` and
``skb->priority`` from ctx_out, and the packet itself (the DS field, when the
node restores it). The node does no flow lookup: the DSCP alone names the color.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sidecar.datapath import abi, bpfsys
from sidecar.datapath.build import Classifier, build_node_classifier
from sidecar.datapath.maps import NodeColorTable, NodeCounters
from sidecar.policy import Color
from tests.bpf import packets as pk
from tests.conftest import require_root

pytestmark = pytest.mark.root

MASK = 0xFF
STABLE = Color("stable", 1, 0x1, dscp=8)  # CS1
CANARY = Color("canary", 2, 0x2, priority=7, dscp=10)  # AF11
LANE = Color("lane", 3, 0x3, dscp=46)  # EF
PLAIN = Color("plain", 4, 0x4)  # no DSCP: invisible on the node
POLICY = (STABLE, CANARY, LANE, PLAIN)
# A test run cannot set skb->tc_classid (the kernel wants it zero), so every packet
# here counts in slot 0; per-interface slots are tested on real traffic
# (tests/netns/test_tc.py, tests/netns/test_node.py).
SLOT = 0

SRC4, DST4 = ("198.18.0.1", 40001), ("198.19.0.10", 8080)
SRC6, DST6 = ("fd00::1", 40003), ("fd00::10", 8080)


@dataclass
class Loaded:
    clf: Classifier
    colors: NodeColorTable
    counters: NodeCounters


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    require_root()
    clf = build_node_classifier(8)
    try:
        m = abi.NODE_MAPS
        state = Loaded(clf, NodeColorTable(clf.maps[m.colors]), NodeCounters(clf.maps[m.stats]))
        state.colors.apply(POLICY, MASK)
        yield state
    finally:
        clf.close()


@pytest.fixture
def policy(loaded: Loaded) -> Iterator[Loaded]:
    """For tests that change the color table: restored after."""
    yield loaded
    loaded.colors.apply(POLICY, MASK)


@dataclass(frozen=True)
class Out:
    retval: int
    mark: int
    priority: int
    data: bytes


def run(
    loaded: Loaded,
    packet: bytes,
    mark: int = 0,
    priority: int = 0,
    repeat: int = 1,
) -> Out:
    ctx = abi.SkBuff(mark=mark, priority=priority)
    res = bpfsys.prog_test_run(loaded.clf.progs["ingress"], packet, ctx=ctx, repeat=repeat)
    assert res.ctx is not None
    out = abi.SkBuff.from_buffer_copy(res.ctx.ljust(ctypes.sizeof(abi.SkBuff), b"\0"))
    return Out(res.retval, out.mark, out.priority, res.data)


def v4(dscp: int, ecn: int = 0, **kw) -> bytes:
    return pk.tcp4(SRC4, DST4, tos=dscp << 2 | ecn, **kw)


def v6(dscp: int, ecn: int = 0) -> bytes:
    return pk.tcp6(SRC6, DST6, tclass=dscp << 2 | ecn)


def udp4(dscp: int) -> bytes:
    return pk.ether(
        pk.ETH_P_IP,
        pk.ipv4(SRC4[0], DST4[0], pk.udp(1, 2, b"q" * 8), proto=pk.IPPROTO_UDP, tos=dscp << 2),
    )


def vlan(frame: bytes) -> bytes:
    """The same frame behind an 802.1Q tag: not parsed, so untouched."""
    return frame[:12] + b"\x81\x00\x00\x05" + frame[12:]


def wrong_version(frame: bytes) -> bytes:
    """The frame with its IP version nibble swapped (4 <-> 6), ethertype kept."""
    first = frame[pk.ETH_LEN]
    return frame[: pk.ETH_LEN] + bytes([first ^ 0x20]) + frame[pk.ETH_LEN + 1 :]


# description, packet, mark in, expected mark, expected priority
ROWS = [
    ("v4 canary DSCP", v4(10), 0, 0x2, 7),
    ("v4 stable DSCP", v4(8), 0, 0x1, 0),
    ("v4 canary with ECN CE", v4(10, ecn=3), 0, 0x2, 7),
    ("v4 canary, IP options", v4(10, options=b"\x01" * 8), 0, 0x2, 7),
    ("v4 UDP carries its color too", udp4(46), 0, 0x3, 0),
    ("v4 foreign mark bits kept", v4(10), 0x4000, 0x4002, 7),
    ("v4 owned mark bits replaced", v4(8), 0x40FE, 0x4001, 0),
    ("v4 foreign DSCP 12", v4(12), 0x4000, 0x4000, 0),
    ("v4 DSCP 0 (unmarked)", v4(0), 0x4000, 0x4000, 0),
    ("v6 canary DSCP", v6(10), 0, 0x2, 7),
    ("v6 lane DSCP, ECN ECT(1)", v6(46, ecn=1), 0x100, 0x103, 0),
    ("v6 foreign DSCP 20", v6(20), 0x4000, 0x4000, 0),
    ("v6 DSCP 0", v6(0), 0, 0, 0),
    ("arp", pk.arp("198.18.0.1", "198.19.0.10"), 0, 0, 0),
    ("VLAN-tagged canary", vlan(v4(10)), 0x4000, 0x4000, 0),
    ("IPv4 ethertype, version 6 header", wrong_version(v4(10)), 0, 0, 0),
    ("IPv6 ethertype, version 4 header", wrong_version(v6(10)), 0, 0, 0),
]


@pytest.mark.parametrize(
    ("packet", "mark_in", "mark", "priority"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_node_table(loaded, packet, mark_in, mark, priority):
    out = run(loaded, packet, mark=mark_in)
    assert out.retval == abi.VERDICT_RETVAL, "never a decision of ours, never a drop"
    assert out.mark == mark, f"mark {out.mark:#x}, expected {mark:#x}"
    assert out.priority == priority
    assert out.data == packet, "without restore_dscp the packet passes untouched"


def test_priority_untouched_without_the_option(loaded):
    out = run(loaded, v4(8), priority=5)
    assert (out.mark, out.priority) == (0x1, 5)


# ------------------------------------------------------------------ restore_dscp


@pytest.mark.parametrize("restore", [0, 26])
def test_restore_dscp_rewrites_colored_packets_only(policy, restore):
    policy.colors.apply(POLICY, MASK, restore_dscp=restore)
    packet = v4(10, ecn=2)
    out = run(policy, packet)
    assert out.mark == 0x2
    assert pk.ipv4_tos(out.data) == restore << 2 | 2, "DSCP restored, ECN kept"
    assert pk.ipv4_header_ok(out.data), "IPv4 header checksum broken by the restore"
    changed = [i for i, (a, b) in enumerate(zip(packet, out.data, strict=True)) if a != b]
    assert set(changed) <= {pk.ETH_LEN + 1, pk.ETH_LEN + 10, pk.ETH_LEN + 11}

    packet6 = v6(46, ecn=1)
    out6 = run(policy, packet6)
    assert out6.mark == 0x3
    assert pk.ipv6_tclass(out6.data) == restore << 2 | 1
    assert pk.ipv6_flow_label(out6.data) == pk.ipv6_flow_label(packet6)
    assert out6.data[pk.ETH_LEN + 4 :] == packet6[pk.ETH_LEN + 4 :]

    foreign = v4(12)
    assert run(policy, foreign).data == foreign, "foreign DSCP values stay as they are"


# --------------------------------------------------------------------- counters


def _delta(before, after, key) -> tuple[int, int]:
    a, b = after.get(key, (0, 0)), before.get(key, (0, 0))
    return a[0] - b[0], a[1] - b[1]


def test_counters_per_color(loaded):
    before = loaded.counters.read([SLOT])
    canary, stable = v4(10), v6(8)
    run(loaded, canary, repeat=7)
    run(loaded, stable, repeat=3)
    run(loaded, v4(12), repeat=11)  # foreign: counted nowhere
    after = loaded.counters.read([SLOT])
    assert _delta(before, after, (SLOT, CANARY.id)) == (7, 7 * len(canary))
    assert _delta(before, after, (SLOT, STABLE.id)) == (3, 3 * len(stable))
    total = sum(p for p, _ in after.values()) - sum(p for p, _ in before.values())
    assert total == 10


def test_zero_starts_a_slot_from_zero(loaded):
    run(loaded, v4(10), repeat=5)
    assert loaded.counters.read([SLOT])[(SLOT, CANARY.id)][0] >= 5
    loaded.counters.zero(SLOT)
    assert loaded.counters.read([SLOT]) == {}


def test_a_slot_past_the_counters_is_refused(loaded):
    with pytest.raises(ValueError, match=r"counter slot 8 is not in 0\.\.7"):
        loaded.counters.zero(8)
    with pytest.raises(ValueError, match="counter slot 8"):
        loaded.counters.read([8])
    with pytest.raises(ValueError, match="does not fit a classid"):
        abi.node_classid(65536)
    assert abi.node_classid(0) == 0, "slot 0: no classid on the filter"
    assert abi.node_classid(7) == 0x10007


# ------------------------------------------------------------------ color table


def test_reload_moves_a_color_to_another_dscp_at_once(policy):
    gen = policy.colors.generation()
    moved = Color("canary", 2, 0x5, dscp=12)
    policy.colors.apply((STABLE, moved), MASK)
    assert policy.colors.generation() == 1 - gen
    assert run(policy, v4(12), mark=0x4000).mark == 0x4005
    assert run(policy, v4(10), mark=0x4000).mark == 0x4000, "the old DSCP means nothing now"
    assert run(policy, v6(46), mark=0x4000).mark == 0x4000, "lane is gone"
    assert set(policy.colors.read()) == {8, 12}


def test_invalid_table_changes_nothing(policy):
    gen = policy.colors.generation()
    with pytest.raises(ValueError, match="given to two colors"):
        policy.colors.apply((STABLE, Color("twin", 2, 0x2, dscp=8)), MASK)
    with pytest.raises(ValueError, match="outside the mark mask"):
        policy.colors.apply((Color("wide", 1, 0x100, dscp=9),), MASK)
    assert policy.colors.generation() == gen
    assert run(policy, v4(10)).mark == CANARY.mark
