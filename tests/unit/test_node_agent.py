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
        self.fail: DatapathError | None = None

    def attach(self, point, prog_fd, classid=0):
        if self.fail:
            raise self.fail
        self.filters[point.interface] = classid
        return Attachment(None, point.interface, 0, "ingress", 40001, 1, classid)

    def detach(self, att):
        if self.fail:
            raise self.fail
        del self.filters[att.ifname]


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


def _slots(dp: NodeDatapath) -> dict[str, int]:
    return {name: slot for _, name, slot in dp._attached.values()}


TIMEOUT = DatapathError("detach", "the netlink helper did not answer within 60 s")


def test_a_slot_whose_filter_may_still_be_on_is_never_handed_to_another_pod():
    dp, kernel = _agent()
    dp.link_added(10, "veth-a")
    kernel.fail = TIMEOUT
    dp.policy = dataclasses.replace(
        dp.policy, node=dataclasses.replace(dp.policy.node, interfaces=("veth-b*",))
    )
    dp.link_added(10, "veth-a")  # no longer wanted, but the detach times out
    kernel.fail = None
    dp.link_added(11, "veth-b")
    assert kernel.filters == {"veth-a": node_classid(1), "veth-b": node_classid(2)}
    assert _slots(dp) == {"veth-a": 1, "veth-b": 2}, "veth-a is still on: it keeps its slot"
    dp.link_added(10, "veth-a")  # the next event for it: the detach goes through
    assert kernel.filters == {"veth-b": node_classid(2)} and _slots(dp) == {"veth-b": 2}


def test_an_attach_that_may_have_gone_on_holds_its_slot_for_that_interface():
    dp, kernel = _agent()
    kernel.fail = DatapathError("attach", "the netlink helper died")
    dp.link_added(10, "veth-a")
    kernel.fail = None
    dp.link_added(11, "veth-b")
    assert _slots(dp) == {"veth-b": 2}, "slot 1 may be on veth-a already"
    dp.link_added(10, "veth-a")  # tried again: it gets the slot it may already carry
    assert _slots(dp) == {"veth-a": 1, "veth-b": 2}
    kernel.fail = DatapathError("attach", "the netlink helper died")
    dp.link_added(12, "veth-c")
    kernel.fail = None
    dp.link_removed(12)  # gone, and any filter with it: slot 3 is free again
    dp.link_added(13, "veth-d")
    assert _slots(dp)["veth-d"] == 3


def test_an_interface_counted_as_other_moves_into_the_first_slot_that_frees():
    dp, kernel = _agent(max_interfaces=3)  # slots 1 and 2
    for ifindex, name in ((10, "veth-a"), (11, "veth-b"), (12, "veth-c")):
        dp.link_added(ifindex, name)
    assert _slots(dp) == {"veth-a": 1, "veth-b": 2, "veth-c": 0}
    assert kernel.filters["veth-c"] == 0, "no classid: slot 0, counted as 'other'"
    dp.link_removed(10)
    assert _slots(dp) == {"veth-b": 2, "veth-c": 1}
    assert kernel.filters["veth-c"] == node_classid(1)
    dp.link_added(13, "veth-d")
    assert _slots(dp)["veth-d"] == 0, "no slot is free until another leaves"
