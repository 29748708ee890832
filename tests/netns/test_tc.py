"""tc attach and detach in real network namespaces: what `tc filter show` would tell an operator."""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest
from pyroute2 import IPRoute

from sidecar.datapath import abi
from sidecar.datapath import tc as tags
from sidecar.datapath.build import build_node_classifier
from sidecar.datapath.child import tc as tcm
from sidecar.datapath.maps import NodeColorTable, NodeCounters
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint, Color
from tests.netns.netnsutil import Lab, ip, ns_socket, pass_program, run_child, tc, unique

pytestmark = pytest.mark.root

INGRESS, EGRESS = tags.PARENTS["ingress"], tags.PARENTS["egress"]


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture
def pair(lab: Lab) -> tuple[str, str]:
    """Two namespaces joined by a veth named eth0 on both sides."""
    a, b = lab.netns(), lab.netns()
    lab.veth(a, "eth0", b, "eth0")
    return a, b


@pytest.fixture
def prog():
    fd = pass_program()
    yield fd
    os.close(fd)


def filters(netns: str, direction: str) -> list[tags.FilterInfo]:
    with IPRoute(netns=netns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        return tcm.list_filters(ipr, idx, direction)


def qdiscs(netns: str) -> str:
    return tc("qdisc", "show", "dev", "eth0", netns=netns)


def test_attach_ingress_and_egress_in_named_netns_then_detach_leaves_nothing(pair, prog):
    a, _ = pair
    t = tcm.TcAttacher()
    ing = t.attach(AttachPoint("eth0", "ingress", a), prog)
    eg = t.attach(AttachPoint("eth0", "egress", a), prog)

    for direction, att in (("ingress", ing), ("egress", eg)):
        (f,) = filters(a, direction)
        assert f.name == f"traffic-color:{direction}" and f.ours
        assert f.direct_action
        assert (f.pref, f.handle) == (att.pref, att.handle)
        assert f.pref in tags.FILTER_PREFS
    shown = tc("filter", "show", "dev", "eth0", "ingress", netns=a)
    assert "traffic-color:ingress" in shown and "direct-action" in shown
    assert "clsact" in qdiscs(a)

    t.detach(ing)
    assert filters(a, "ingress") == []
    assert "clsact" in qdiscs(a), "egress filter still needs the qdisc"
    t.detach(eg)
    assert filters(a, "egress") == []
    assert "clsact" not in qdiscs(a), "the clsact qdisc we created must go"


def test_a_classid_goes_on_the_filter_and_a_replacement_carries_its_own(pair, prog):
    a, _ = pair
    t = tcm.TcAttacher()
    first = t.attach(AttachPoint("eth0", "ingress", a), prog, classid=0x10007)
    assert first.classid == 0x10007
    assert "flowid 1:7" in tc("filter", "show", "dev", "eth0", "ingress", netns=a)
    second = t.attach(AttachPoint("eth0", "ingress", a), prog, classid=0x10009)
    shown = tc("filter", "show", "dev", "eth0", "ingress", netns=a)
    assert "flowid 1:9" in shown and "flowid 1:7" not in shown
    assert second.pref != first.pref and len(filters(a, "ingress")) == 1
    t.detach(second)
    assert filters(a, "ingress") == []


def _stray_of_ours(netns: str, prog: int, pref: int, classid: int = 0) -> None:
    """A second filter of ours at ``pref``: what a helper killed between add and delete leaves."""
    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.tc(
            "add-filter",
            "bpf",
            ipr.link_lookup(ifname="eth0")[0],
            tags.FILTER_HANDLE,
            fd=prog,
            name=tags.filter_name("ingress"),
            parent=INGRESS,
            prio=pref,
            direct_action=True,
            classid=classid or None,
        )


def test_both_preferences_ours_after_a_cut_short_replacement_is_mended_in_place(pair, prog):
    a, _ = pair
    t = tcm.TcAttacher()
    first = t.attach(AttachPoint("eth0", "ingress", a), prog, classid=0x10001)
    other = next(p for p in tags.FILTER_PREFS if p != first.pref)
    _stray_of_ours(a, prog, other, 0x10002)
    assert len(filters(a, "ingress")) == 2
    att = t.attach(AttachPoint("eth0", "ingress", a), prog, classid=0x10003)
    (only,) = filters(a, "ingress")
    shown = tc("filter", "show", "dev", "eth0", "ingress", netns=a)
    assert only.pref == att.pref and "flowid 1:3" in shown
    _stray_of_ours(a, prog, next(p for p in tags.FILTER_PREFS if p != att.pref))
    t.detach(att)  # takes every filter of ours at that hook
    assert filters(a, "ingress") == []


def test_the_node_classifier_counts_in_the_slot_its_filters_classid_names(pair):
    """cls_bpf hands the filter's classid to the program: real packets, real veth, real slots."""
    a, b = pair
    ip("addr", "add", "198.18.91.1/24", "dev", "eth0", netns=a)
    ip("addr", "add", "198.18.91.2/24", "dev", "eth0", netns=b)
    canary = Color("canary", 2, 0x2, dscp=10)
    t = tcm.TcAttacher()
    with build_node_classifier(8) as clf:
        NodeColorTable(clf.maps[abi.NODE_MAPS.colors]).apply([canary], 0xFF)
        counters = NodeCounters(clf.maps[abi.NODE_MAPS.stats])
        point = AttachPoint("eth0", "ingress", b)

        def send(count: int) -> None:
            with ns_socket(a, kind=socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, canary.dscp << 2)
                for _ in range(count):
                    s.sendto(b"x", ("198.18.91.2", 9))
            time.sleep(0.2)

        t.attach(point, clf.progs["ingress"], classid=abi.node_classid(3))
        send(4)
        t.attach(point, clf.progs["ingress"], classid=abi.node_classid(5))
        send(2)
        last = t.attach(point, clf.progs["ingress"])
        send(1)
        counted = counters.read(range(8))
        t.detach(last)
    assert {slot: p for (slot, cid), (p, _) in counted.items() if cid == canary.id} == {
        3: 4,
        5: 2,
        0: 1,
    }


def test_preexisting_clsact_and_foreign_filter_are_left_alone(pair, prog):
    a, _ = pair
    with IPRoute(netns=a, flags=0) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc(
            "add-filter",
            "bpf",
            idx,
            1,
            fd=prog,
            name="someone-else",
            parent=INGRESS,
            prio=10,
            direct_action=True,
        )
    t = tcm.TcAttacher()
    ing = t.attach(AttachPoint("eth0", "ingress", a), prog)
    eg = t.attach(AttachPoint("eth0", "egress", a), prog)
    assert sorted(f.name for f in filters(a, "ingress")) == [
        "someone-else",
        "traffic-color:ingress",
    ]
    t.detach(ing)
    t.detach(eg)
    (left,) = filters(a, "ingress")
    assert (left.name, left.pref) == ("someone-else", 10)
    assert filters(a, "egress") == []
    assert "clsact" in qdiscs(a)


def test_preexisting_empty_clsact_survives_both_hooks(pair, prog):
    """An empty clsact someone made before us is theirs, even after we filled both hooks."""
    a, _ = pair
    tc("qdisc", "add", "dev", "eth0", "clsact", netns=a)
    t = tcm.TcAttacher()
    atts = [t.attach(AttachPoint("eth0", d, a), prog) for d in ("ingress", "egress")]
    for att in atts:
        t.detach(att)
    assert filters(a, "ingress") == [] and filters(a, "egress") == []
    assert "clsact" in qdiscs(a)


def test_replacing_adds_at_the_other_preference_and_keeps_one_filter(pair, prog):
    a, _ = pair
    point = AttachPoint("eth0", "ingress", a)
    t = tcm.TcAttacher()
    first = t.attach(point, prog)
    second_fd = pass_program()
    try:
        second = t.attach(point, second_fd)
    finally:
        os.close(second_fd)
    assert {first.pref, second.pref} == set(tags.FILTER_PREFS)
    (f,) = filters(a, "ingress")
    assert f.pref == second.pref
    t.detach(second)
    assert "clsact" not in qdiscs(a)


def test_sweep_removes_leftovers_of_a_crashed_run(pair):
    """A run that exits without detaching leaves its filter; the next run's sweep removes it."""
    a, _ = pair
    run_child(
        textwrap.dedent(f"""
        import os
        from sidecar.datapath import bpfsys
        from sidecar.datapath.child import tc
        from sidecar.policy import AttachPoint
        fd = bpfsys.prog_load_sched_cls(bpfsys.RETURN_OK_INSNS, "crashed")
        tc.TcAttacher().attach(AttachPoint("eth0", "egress", {a!r}), fd)
        os._exit(3 - 3)  # no detach, no cleanup: a crash as far as the kernel can tell
    """)
    )
    assert [f.name for f in filters(a, "egress")] == ["traffic-color:egress"]
    t = tcm.TcAttacher()
    assert t.sweep(a) == 1
    assert filters(a, "egress") == []
    assert "clsact" not in qdiscs(a), "a qdisc holding only our leftovers was ours"
    assert t.sweep(a) == 0


def test_unknown_interface_and_namespace_fail_with_the_step(pair, prog):
    a, _ = pair
    t = tcm.TcAttacher()
    with pytest.raises(DatapathError) as exc:
        t.attach(AttachPoint("nosuch0", "ingress", a), prog)
    assert exc.value.step == "attach" and "nosuch0" in str(exc.value)
    ghost = unique("ghost")
    with pytest.raises(DatapathError) as exc:
        t.attach(AttachPoint("eth0", "ingress", ghost), prog)
    assert exc.value.step == "netns"
    assert not os.path.exists(f"/var/run/netns/{ghost}"), "must never create a namespace"
