"""The node agent's pure decisions: which interfaces, which slots, which policies it can run."""

from __future__ import annotations

import contextlib
import dataclasses
import types

from sidecar.admin.status import format_status
from sidecar.datapath.abi import node_classid
from sidecar.datapath.node import NodeDatapath, SlotPool, wants
from sidecar.datapath.tc import Attachment
from sidecar.errors import DatapathError
from sidecar.node import check_node_policy
from sidecar.policy import parse_policy


def test_globs_name_pod_interfaces_only():
    globs = ("veth*", "cali*", "lxc*")
    assert wants("veth1a2b3c", globs) and wants("cali12345", globs) and wants("lxc_health", globs)
    assert not wants("eth0", globs) and not wants("lo", globs) and not wants("cilium_host", globs)
    assert not wants("VETH1", globs), "interface names are case-sensitive"


def test_slots_are_reused_and_run_out_to_unattributed():
    pool = SlotPool(4)
    assert [pool.take(), pool.take(), pool.take()] == [1, 2, 3]
    assert pool.take() == 0, "all in use: counted as unattributed"
    pool.give(2)
    pool.give(0)  # unattributed is never handed back as a slot
    assert pool.take() == 2 and pool.take() == 0


def test_the_agent_refuses_policies_it_cannot_run():
    base = "version: 1\ncolors:\n  stable: {mark: 1, dscp: 8}\n"
    assert "node.interfaces is empty" in check_node_policy(parse_policy(base))
    ok = parse_policy(base + "node: {interfaces: [veth*]}\n")
    assert check_node_policy(ok) is None
    plain = parse_policy("version: 1\ncolors:\n  stable: {mark: 1}\n")  # a pod's policy
    assert "node.interfaces is empty" in check_node_policy(plain)


STATUS = {
    "kind": "node",
    "version": "0.1.0",
    "ready": True,
    "ready_reason": "ready",
    "policy": {"source": "n.yaml", "digest": "abc", "mark_mask": 255},
    "listeners": {"admin": "127.0.0.1:15091"},
    "error": None,
    "datapath": {
        "colors": [
            {"name": "canary", "dscp": 10, "mark": 2, "table": 102},
            {"name": "stable", "dscp": 8, "mark": 1, "table": None},
        ],
        "counters": {"canary": {"veth-b": {"packets": 7, "bytes": 700}}},
        "interface_globs": ["veth*"],
        "restore_dscp": 0,
        "interfaces": [{"interface": "veth-b", "ifindex": 9, "filter": {"pref": 40001}}],
        "routing": {
            "rules": [
                {"family": "inet", "priority": 10002, "fwmark": 2, "fwmask": 255, "table": 102}
            ],
            "routes": [{"table": 102, "dst": "198.18.100.0/24", "via": "198.18.3.2"}],
        },
    },
}


def test_status_of_a_node_reads_as_a_node():
    text = format_status(STATUS)
    assert "node agent" in text and "DSCP restored to 0" in text
    assert "canary  10    0x2   102    7        700" in text
    assert "stable  8     0x1   main   0        0\n" in text
    assert "tc ingress on veth-b (ifindex 9, pref 40001): canary 7" in text
    assert "ip -4 rule 10002: fwmark 0x2/0xff lookup 102" in text
    down = format_status({**STATUS, "datapath": None, "error": "boom"})
    assert "node data path: NOT attached (boom)" in down


class _Kernel:
    """Stands in for the netlink helper: which classid each interface's filter carries."""

    def __init__(self) -> None:
        self.filters: dict[str, int] = {}
        self.links: dict[str, int] = {}
        self.fail: DatapathError | None = None

    def attach(self, point, prog_fd, classid=0):
        if self.fail:
            raise self.fail
        self.filters[point.interface] = classid
        ifindex = self.links[point.interface]
        return Attachment(None, point.interface, ifindex, "ingress", 40001, 1, classid)

    def detach(self, att):
        if self.fail:
            raise self.fail
        self.filters.pop(att.ifname, None)


class _Counters:
    def zero(self, slot: int) -> None:
        pass

    def read(self, slots):
        return {}


def _agent(max_interfaces: int = 8) -> tuple[NodeDatapath, _Kernel]:
    policy = parse_policy(
        "version: 1\ncolors:\n  stable: {mark: 1, dscp: 8}\nnode: {interfaces: [veth*]}\n"
    )
    dp = NodeDatapath(policy, max_interfaces=max_interfaces)
    kernel = _Kernel()
    dp._clf = types.SimpleNamespace(progs={"ingress": -1})
    dp._counters = _Counters()
    dp._session = contextlib.contextmanager(lambda: (yield kernel))
    return dp, kernel


def _up(dp: NodeDatapath, kernel: _Kernel, ifindex: int, name: str) -> None:
    kernel.links[name] = ifindex
    dp.link_added(ifindex, name)


def _down(dp: NodeDatapath, kernel: _Kernel, ifindex: int) -> None:
    """The link goes, and its filters with it."""
    name = next(n for n, i in kernel.links.items() if i == ifindex)
    del kernel.links[name]
    kernel.filters.pop(name, None)
    dp.link_removed(ifindex)


def _slots(dp: NodeDatapath) -> dict[str, int]:
    return {name: slot for _, name, slot in dp._attached.values()}


TIMEOUT = DatapathError("detach", "the netlink helper did not answer within 60 s")


def test_a_slot_whose_filter_may_still_be_on_is_never_handed_to_another_pod():
    dp, kernel = _agent()
    _up(dp, kernel, 10, "veth-a")
    kernel.fail = TIMEOUT
    dp.policy = dataclasses.replace(
        dp.policy, node=dataclasses.replace(dp.policy.node, interfaces=("veth-b*",))
    )
    _up(dp, kernel, 10, "veth-a")  # no longer wanted, but the detach times out
    assert _slots(dp) == {"veth-a": 1}, "veth-a is still on: it keeps its slot"
    kernel.fail = None
    _up(dp, kernel, 11, "veth-b")  # attached, then the failed detach is tried again
    assert _slots(dp) == {"veth-b": 2}, "slot 1 was veth-a's while its filter might be on"
    assert kernel.filters == {"veth-b": node_classid(2)}


def test_an_attach_that_may_have_gone_on_holds_its_slot_for_that_interface():
    dp, kernel = _agent()
    kernel.fail = DatapathError("attach", "the netlink helper died")
    _up(dp, kernel, 10, "veth-a")
    kernel.fail = None
    _up(dp, kernel, 11, "veth-b")
    assert _slots(dp) == {"veth-b": 2}, "slot 1 may be on veth-a already"
    _up(dp, kernel, 10, "veth-a")  # tried again: it gets the slot it may already carry
    assert _slots(dp) == {"veth-a": 1, "veth-b": 2}
    kernel.fail = DatapathError("attach", "the netlink helper died")
    _up(dp, kernel, 12, "veth-c")
    kernel.fail = None
    _down(dp, kernel, 12)  # gone, and any filter with it: slot 3 is free again
    _up(dp, kernel, 13, "veth-d")
    assert _slots(dp)["veth-d"] == 3


def test_an_interface_counted_as_other_moves_into_the_first_slot_that_frees():
    dp, kernel = _agent(max_interfaces=3)  # slots 1 and 2
    for ifindex, name in ((10, "veth-a"), (11, "veth-b"), (12, "veth-c")):
        _up(dp, kernel, ifindex, name)
    assert _slots(dp) == {"veth-a": 1, "veth-b": 2, "veth-c": 0}
    assert kernel.filters["veth-c"] == 0, "no classid: slot 0, counted as 'other'"
    _down(dp, kernel, 10)
    assert _slots(dp) == {"veth-b": 2, "veth-c": 1}
    assert kernel.filters["veth-c"] == node_classid(1)
    _up(dp, kernel, 13, "veth-d")
    assert _slots(dp)["veth-d"] == 0, "no slot is free until another leaves"


def _accounted(dp: NodeDatapath, size: int) -> None:
    """Every slot is free, held for an interface, or counting for one: exactly once."""
    free = list(dp._slots._free)
    held = [slot for _, slot in dp._held.values() if slot]
    used = [slot for _, _, slot in dp._attached.values() if slot]
    assert sorted(free + held + used) == list(range(1, size)), (free, held, used)


def test_promotions_that_keep_failing_lose_no_slot():
    dp, kernel = _agent(max_interfaces=3)
    for ifindex in range(10, 14):
        _up(dp, kernel, ifindex, f"veth{ifindex}")
    kernel.fail = TIMEOUT
    _down(dp, kernel, 10)  # veth12 would move into slot 1: the attach times out
    _down(dp, kernel, 11)
    _accounted(dp, 3)
    assert _slots(dp) == {"veth12": 0, "veth13": 0} and dp._held == {12: ("veth12", 1)}
    kernel.fail = None
    _up(dp, kernel, 14, "veth14")  # the next link event tries veth12's promotion again
    _accounted(dp, 3)
    assert _slots(dp) == {"veth12": 1, "veth13": 0, "veth14": 2}
    assert kernel.filters["veth12"] == node_classid(1), "into the slot it may already carry"


def test_a_removed_interface_is_never_promoted_and_a_held_filter_comes_off_when_unnamed():
    dp, kernel = _agent(max_interfaces=2)  # slot 1 only
    _up(dp, kernel, 10, "veth-a")
    _up(dp, kernel, 11, "veth-b")  # counted as other
    kernel.fail = TIMEOUT
    _down(dp, kernel, 10)  # veth-b's promotion times out: slot 1 held for it
    kernel.fail = None
    _down(dp, kernel, 11)  # gone: its records and its held slot go, nothing is promoted for it
    assert dp._held == {} and dp._attached == {}
    _accounted(dp, 2)
    kernel.fail = DatapathError("attach", "the netlink helper died")
    _up(dp, kernel, 12, "veth-c")
    kernel.fail = None
    dp.policy = dataclasses.replace(
        dp.policy, node=dataclasses.replace(dp.policy.node, interfaces=("cali*",))
    )
    _up(dp, kernel, 12, "veth-c")  # no longer named: the filter that may be on comes off
    assert "veth-c" not in kernel.filters and dp._held == {}
    _accounted(dp, 2)
