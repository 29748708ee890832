"""Failure modes of the data path that could leave a node dirty or mis-route flows.

Each test builds on the router topology of ``test_manager`` (its own copy,
under unique names) and checks what an operator would: which host answers an
open flow, and which filters, qdiscs, rules and routes the kernel holds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from sidecar.datapath import ctl
from sidecar.datapath import tc as tags
from sidecar.datapath.child import tc as tcm
from sidecar.datapath.manager import DatapathManager
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint, parse_policy
from tests.netns.netnsutil import Flow, ip, tc, unique
from tests.netns.test_manager import CLIENT4, PORT, SVC4, SVC6, Topo, fetch

pytestmark = pytest.mark.root


def without_canary(topo: Topo, *, size: int = 1024, extra: tuple[str, ...] = ()):
    """A policy that drops the canary color and attaches also at ``extra`` (name:direction)."""
    r = topo.router
    points = "\n".join(
        f"    - {{interface: {p.split(':')[0]}, direction: {p.split(':')[1]}, netns: {r}}}"
        for p in ("r-c:ingress", *extra)
    )
    text = f"""\
version: 1
mark_mask: 0xff
colors:
  stable: {{mark: 0x1}}
  dark: {{mark: 0x4}}
datapath:
  enabled: true
  flow_table_size: {size}
  attach:
{points}
  routing:
    netns: {r}
    rule_priority: 10000
"""
    return parse_policy(textwrap.dedent(text), "<test>")


def our_points(mgr: DatapathManager) -> list[tuple[str, str]]:
    return sorted((a["interface"], a["direction"]) for a in mgr.status()["attach_points"])


@pytest.mark.parametrize("size", [1024, 2048], ids=["same-program", "recompile"])
def test_a_failed_reload_that_drops_a_color_keeps_its_open_flows(topo, mgr_factory, size):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    with Flow(topo.client, CLIENT4, SVC4, PORT) as held:
        mgr.flow_open("canary", held.local, held.remote)
        assert held.connect().ask() == "canary"

        with pytest.raises(DatapathError) as exc:
            mgr.apply(without_canary(topo, size=size, extra=("nosuch0:ingress",)))
        assert exc.value.step == "attach" and "nosuch0" in str(exc.value)

        assert held.ask() == "canary", "the running policy still colors the open flow"
        st = mgr.status()
        assert st["flows"]["by_color"] == {"canary": 1} and st["flows"]["registered"] == 1
        mgr.flow_close("canary", held.local, held.remote)
    assert mgr.status()["flows"]["in_map"] == 0, "flow_close still removes the flow"
    assert fetch(topo, mgr, "canary", SVC4) == "canary"


@pytest.mark.parametrize("size", [1024, 2048], ids=["same-program", "recompile"])
def test_a_reload_that_drops_a_color_forgets_its_open_flows(topo, mgr_factory, size):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    with Flow(topo.client, CLIENT4, SVC4, PORT) as held:
        mgr.flow_open("canary", held.local, held.remote)
        assert held.connect().ask() == "canary"
        mgr.apply(without_canary(topo, size=size))
        st = mgr.status()
        assert st["flows"]["in_map"] == 0 and st["flows"]["registered"] == 0
        mgr.flow_close("canary", held.local, held.remote)
    assert (mgr.evictions, mgr.flow_errors) == (0, 0)
    assert topo.our_rules() == [] and topo.our_routes() == []
    assert fetch(topo, mgr, "dark", SVC4) == "stable"


@pytest.mark.parametrize("size", [1024, 2048], ids=["same-program", "recompile"])
def test_a_failed_reload_removes_the_attach_points_it_added(topo, mgr_factory, size):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    extra = AttachPoint("r-s", "egress", topo.router)

    with pytest.raises(DatapathError):
        mgr.apply(without_canary(topo, size=size, extra=("r-s:egress", "nosuch0:ingress")))

    assert tcm.present(extra) == [], "no filter of ours where the running policy has none"
    assert "clsact" not in tc("qdisc", "show", "dev", "r-s", netns=topo.router)
    assert our_points(mgr) == [("r-c", "ingress")]
    assert len(tcm.present(topo.point())) == 1
    assert fetch(topo, mgr, "canary", SVC4) == "canary"


def test_an_attach_interface_deleted_while_running_then_stop(topo, mgr_factory, caplog):
    """The veth goes away under us: stop raises nothing and leaves nothing of ours."""
    r = topo.router
    ip("link", "add", "tmp-a", "type", "veth", "peer", "name", "tmp-b", netns=r)
    try:
        ip("link", "set", "tmp-a", "up", netns=r)
        policy = topo.policy()
        extra = AttachPoint("tmp-a", "egress", r)
        dp = dataclasses.replace(policy.datapath, attach=(topo.point(), extra))
        policy = dataclasses.replace(policy, datapath=dp)
        mgr = mgr_factory(policy)
        mgr.start()
        assert len(tcm.present(AttachPoint("tmp-a", "egress", r))) == 1
    finally:
        ip("link", "del", "tmp-a", netns=r, check=False)
    mgr.close()
    topo.assert_clean()
    assert "data path close" not in caplog.text, "stop met no error"


def masked_policy(topo: Topo, mask: int, canary_mark: int, *, size: int = 1024):
    """The standard policy under another ``mark_mask``."""
    r = topo.router
    text = f"""\
version: 1
mark_mask: {mask:#x}
colors:
  stable: {{mark: {mask & -mask:#x}}}
  canary: {{mark: {canary_mark:#x}}}
datapath:
  enabled: true
  flow_table_size: {size}
  attach:
    - {{interface: r-c, direction: ingress, netns: {r}}}
  routing:
    netns: {r}
    rule_priority: 10000
    colors:
      canary:
        table: 102
        routes:
          - {{dst: 198.18.100.0/24, via: 198.18.3.2}}
          - {{dst: "fd00:100::/64", via: "fd00:3::2"}}
"""
    return parse_policy(text, "<test>")


def test_a_reload_that_changes_mark_mask_re_points_rules_and_open_flows(topo, mgr_factory):
    mgr = mgr_factory(masked_policy(topo, 0xFF, 0x2))
    mgr.start()
    with Flow(topo.client, CLIENT4, SVC4, PORT) as held:
        mgr.flow_open("canary", held.local, held.remote)
        assert held.connect().ask() == "canary"
        mgr.apply(masked_policy(topo, 0xFF00, 0x200))
        assert topo.our_rules() == ["10002:\tfrom all fwmark 0x200/0xff00 lookup 102 proto 165"] * 2
        assert held.ask() == "canary"
        mgr.apply(masked_policy(topo, 0xF0, 0x20, size=2048))
        assert topo.our_rules() == ["10002:\tfrom all fwmark 0x20/0xf0 lookup 102 proto 165"] * 2
        assert held.ask() == "canary"
        mgr.flow_close("canary", held.local, held.remote)
    assert fetch(topo, mgr, "stable", SVC6) == "stable"


FOREIGN_RULES = (
    ("pref", "10002", "fwmark", "0x2/0xff", "lookup", "102"),  # ours, but not tagged
    ("pref", "10002", "fwmark", "0x2/0xff", "lookup", "200"),
)


def foreign_rules(topo: Topo) -> list[str]:
    out = ip("-4", "rule", netns=topo.router) + ip("-6", "rule", netns=topo.router)
    return sorted(
        line.strip() for line in out.splitlines() if "fwmark" in line and "165" not in line
    )


def test_foreign_clsact_filters_and_fwmark_rules_survive_start_reload_stop(topo, mgr_factory):
    from pyroute2 import IPRoute

    from tests.netns.netnsutil import pass_program

    r = topo.router
    tc("qdisc", "add", "dev", "r-c", "clsact", netns=r)
    fd = pass_program()
    try:
        with IPRoute(netns=r, flags=0) as ipr:
            idx = ipr.link_lookup(ifname="r-c")[0]
            for parent in (tags.PARENTS["ingress"], tags.PARENTS["egress"]):
                ipr.tc("add-filter", "bpf", idx, 7, fd=fd, name="cni", parent=parent, prio=100)
        for fam in ("-4", "-6"):
            for rule in FOREIGN_RULES:
                ip(fam, "rule", "add", *rule, netns=r)
        theirs = foreign_rules(topo)
        assert len(theirs) == 4

        mgr = mgr_factory(topo.policy())
        mgr.start()
        assert len(topo.our_rules()) == 2 and foreign_rules(topo) == theirs
        assert fetch(topo, mgr, "canary", SVC4) == "canary"
        mgr.apply(topo.policy(size=2048))
        mgr.apply(topo.policy(canary_mark=0x8, table=103))
        assert fetch(topo, mgr, "canary", SVC6) == "canary"
        mgr.close()

        assert topo.our_rules() == [] and foreign_rules(topo) == theirs
        assert tcm.present(topo.point()) == []
        for hook in ("ingress", "egress"):
            shown = tc("filter", "show", "dev", "r-c", hook, netns=r)
            assert "cni" in shown and "traffic-color" not in shown
    finally:
        os.close(fd)
        tc("qdisc", "del", "dev", "r-c", "clsact", netns=r, check=False)
        for fam in ("-4", "-6"):
            for rule in FOREIGN_RULES:
                ip(fam, "rule", "del", *rule, netns=r, check=False)


def killed_child(code: str, timeout: float = 60.0) -> None:
    """Run Python ``code`` in a fresh interpreter that ends by SIGKILL (no cleanup at all)."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_sigkill_holding_two_filters_then_a_new_manager_leaves_one_of_each(topo, mgr_factory):
    """A run killed mid-swap (two filters of ours on one hook) is replaced cleanly."""
    killed_child(
        textwrap.dedent(f"""
        import os, signal
        from pyroute2 import IPRoute
        from tests.netns.test_manager import Topo
        from sidecar.datapath import tc as tags
        from sidecar.datapath.manager import DatapathManager
        t = Topo.__new__(Topo)
        t.router = {topo.router!r}
        m = DatapathManager(t.policy())
        m.start()
        (att,) = m._attachments.values()
        other = [p for p in tags.FILTER_PREFS if p != att.pref][0]
        with IPRoute(netns=t.router, flags=0) as ipr:
            ipr.tc("add-filter", "bpf", att.ifindex, 1, fd=m._loaded.classifier.progs["ingress"],
                   name=tags.filter_name("ingress"), parent=tags.PARENTS["ingress"], prio=other,
                   direct_action=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    )
    assert len(tcm.present(topo.point())) == 2
    mgr = mgr_factory(topo.policy())
    mgr.start()
    assert len(tcm.present(topo.point())) == 1
    assert len(topo.our_rules()) == 2 and len(topo.our_routes()) == 3
    assert fetch(topo, mgr, "canary", SVC4) == "canary"


def test_a_full_flow_table_still_colors_new_flows_and_counts_evictions(topo, mgr_factory):
    """The LRU makes room for a new flow; flows it pushed out close as evictions."""
    mgr = mgr_factory(topo.policy(size=16))
    mgr.start()
    stale = [((CLIENT4, 30000 + i), ("198.18.100.9", 9)) for i in range(200)]
    for local, remote in stale:
        mgr.flow_open("stable", local, remote)
    assert 0 < mgr.status()["flows"]["in_map"] <= 16
    for _ in range(5):
        assert fetch(topo, mgr, "canary", SVC4) == "canary"
    for local, remote in stale:
        mgr.flow_close("stable", local, remote)
    st = mgr.status()
    assert st["flows"] == {"in_map": 0, "by_color": {}, "registered": 0}
    assert 200 - 16 <= mgr.evictions <= 200 + 5 and mgr.flow_errors == 0


def test_a_start_whose_netlink_helper_dies_still_removes_what_it_installed(
    topo, mgr_factory, monkeypatch
):
    """The helper is killed (OOM, timeout) after rules and routes went in: none stays."""
    real_attach = ctl.NetlinkSession.attach

    def attach_after_death(self, point, prog_fd):
        self._kill()
        return real_attach(self, point, prog_fd)

    monkeypatch.setattr(ctl.NetlinkSession, "attach", attach_after_death)
    mgr = mgr_factory(topo.policy())
    with pytest.raises(DatapathError) as exc:
        mgr.start()
    assert "helper" in str(exc.value)
    assert topo.our_rules() == [] and topo.our_routes() == []
    topo.assert_clean()


def test_a_reload_whose_netlink_helper_dies_rolls_back_through_a_new_one(
    topo, mgr_factory, monkeypatch
):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    rules, routes = topo.our_rules(), topo.our_routes()
    extra = AttachPoint("r-s", "egress", topo.router)
    failed = topo.policy(canary_mark=0x8, table=103)
    dp = dataclasses.replace(failed.datapath, attach=(topo.point(), extra))
    real_attach = ctl.NetlinkSession.attach

    def attach_after_death(self, point, prog_fd):
        self._kill()
        return real_attach(self, point, prog_fd)

    monkeypatch.setattr(ctl.NetlinkSession, "attach", attach_after_death)
    with pytest.raises(DatapathError):
        mgr.apply(dataclasses.replace(failed, datapath=dp))
    monkeypatch.undo()

    assert topo.our_rules() == rules and topo.our_routes() == routes
    assert tcm.present(extra) == []
    assert fetch(topo, mgr, "canary", SVC4) == "canary"


def test_a_swap_whose_netlink_helper_dies_puts_the_old_program_back(topo, mgr_factory, monkeypatch):
    """The filter must run the program whose maps new flows are written to."""
    mgr = mgr_factory(topo.policy(size=1024))
    mgr.start()
    extra = AttachPoint("r-s", "egress", topo.router)
    failed = topo.policy(size=2048)
    dp = dataclasses.replace(failed.datapath, attach=(topo.point(), extra))
    real_attach = ctl.NetlinkSession.attach

    def die_at_extra(self, point, prog_fd):
        if point == extra:
            self._kill()
        return real_attach(self, point, prog_fd)

    monkeypatch.setattr(ctl.NetlinkSession, "attach", die_at_extra)
    with pytest.raises(DatapathError):
        mgr.apply(dataclasses.replace(failed, datapath=dp))
    monkeypatch.undo()

    assert mgr.status()["flow_table_size"] == 1024
    assert len(tcm.present(topo.point())) == 1 and tcm.present(extra) == []
    assert fetch(topo, mgr, "canary", SVC4) == "canary"


class _SnapshotEveryRelease:
    """Stands in for the manager's flow lock; reads the counters each time it is let go.

    A metrics scrape can come at any moment of a swap: this one comes at every
    point where the swap lets go of the lock.
    """

    def __init__(self, mgr: DatapathManager) -> None:
        self.mgr, self.real, self.seen = mgr, threading.Lock(), []
        self.depth = 0
        self.reading = False  # the snapshot may take this lock itself

    def __enter__(self):
        self.real.acquire()
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        self.real.release()
        if self.depth == 0 and not self.reading:
            self.reading = True
            try:
                counters = self.mgr.snapshot().counters
            finally:
                self.reading = False
            self.seen.append(counters.get(("canary", "ingress"), (0, 0))[0])


def test_counters_never_go_backwards_during_a_swap(topo, mgr_factory):
    mgr = mgr_factory(topo.policy(size=1024))
    mgr.start()
    assert fetch(topo, mgr, "canary", SVC4) == "canary"
    before = mgr.snapshot().counters[("canary", "ingress")][0]
    probe = _SnapshotEveryRelease(mgr)
    mgr._flow_lock = probe
    try:
        mgr.apply(topo.policy(size=2048))
    finally:
        mgr._flow_lock = probe.real
    assert probe.seen and min(probe.seen) >= before, probe.seen


@pytest.mark.parametrize("where", ["attach", "routing"])
def test_a_policy_naming_a_missing_netns_fails_start_and_leaves_nothing(topo, mgr_factory, where):
    ghost = f"/var/run/netns/{unique('ghost')}"
    policy = topo.policy()
    dp = policy.datapath
    if where == "attach":
        dp = dataclasses.replace(dp, attach=(AttachPoint("r-c", "ingress", ghost),))
    else:
        dp = dataclasses.replace(dp, routing=dataclasses.replace(dp.routing, netns=ghost))
    mgr = mgr_factory(dataclasses.replace(policy, datapath=dp))
    with pytest.raises(DatapathError) as exc:
        mgr.start()
    assert exc.value.step == "netns" and ghost in str(exc.value)
    assert not os.path.exists(ghost), "a typo must never create a namespace"
    assert not mgr.attached
    mgr.close()
    topo.assert_clean()


def test_a_reload_dropping_an_attach_point_whose_interface_vanished(topo, mgr_factory, caplog):
    r = topo.router
    extra = AttachPoint("tmp-c", "egress", r)
    ip("link", "add", "tmp-c", "type", "veth", "peer", "name", "tmp-d", netns=r)
    try:
        ip("link", "set", "tmp-c", "up", netns=r)
        policy = topo.policy()
        dp = dataclasses.replace(policy.datapath, attach=(topo.point(), extra))
        mgr = mgr_factory(dataclasses.replace(policy, datapath=dp))
        mgr.start()
        assert len(tcm.present(extra)) == 1
    finally:
        ip("link", "del", "tmp-c", netns=r, check=False)
    mgr.apply(topo.policy(canary_mark=0x8, table=103))
    assert our_points(mgr) == [("r-c", "ingress")]
    assert fetch(topo, mgr, "canary", SVC4) == "canary"
    mgr.close()
    assert "data path close" not in caplog.text, "stop met no error"
