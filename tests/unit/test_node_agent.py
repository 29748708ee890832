"""The node agent's pure decisions: which interfaces, which slots, which policies it can run."""

from __future__ import annotations

from sidecar.admin.status import format_status
from sidecar.datapath.node import SlotPool, wants
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
