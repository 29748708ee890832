"""The whole data path on a real topology with real TCP, IPv4 and IPv6.

    client ns                router ns                        stable ns
    c0 198.18.1.2 ---- r-c 198.18.1.1   r-s 198.18.2.1 ---- s0 198.18.2.2, lo 198.18.100.1
       fd00:1::2          fd00:1::1     fd00:2::1            fd00:2::2,   lo fd00:100::1
                       [classifier at      r-k 198.18.3.1 ---- canary ns
                        tc ingress of r-c]  fd00:3::1           k0 198.18.3.2, lo 198.18.100.1
                                                                   fd00:3::2,   lo fd00:100::1

Both service hosts hold the same service address. The router's main table
sends it to stable; the canary color's table 102 (installed by the manager
from the policy) sends it to canary. A flow reaches canary only if the
classifier marked its packets at tc ingress of r-c and `ip rule fwmark`
picked table 102: the answering host's name is the proof.
"""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from sidecar.datapath import manager as manager_mod
from sidecar.datapath import tc as tags
from sidecar.datapath.child import tc as tcm
from sidecar.datapath.doctor import run_doctor
from sidecar.datapath.manager import DatapathManager
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint, parse_policy
from tests.netns.netnsutil import Flow, Lab, ip, run_child, sysctl, tc

pytestmark = pytest.mark.root

SVC4, SVC6, PORT = "198.18.100.1", "fd00:100::1", 8080
CLIENT4, CLIENT6 = "198.18.1.2", "fd00:1::2"


class Topo:
    def __init__(self, lab: Lab) -> None:
        self.client, self.router = lab.netns("tcc"), lab.netns("tcr")
        self.stable, self.canary = lab.netns("tcs"), lab.netns("tck")
        lab.veth(self.client, "c0", self.router, "r-c")
        lab.veth(self.router, "r-s", self.stable, "s0")
        lab.veth(self.router, "r-k", self.canary, "k0")
        r = self.router
        for dev, v4, v6 in (
            ("r-c", "198.18.1.1/24", "fd00:1::1/64"),
            ("r-s", "198.18.2.1/24", "fd00:2::1/64"),
            ("r-k", "198.18.3.1/24", "fd00:3::1/64"),
        ):
            ip("addr", "add", v4, "dev", dev, netns=r)
            ip("addr", "add", v6, "dev", dev, "nodad", netns=r)
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            sysctl(r, key, value)
        for dev in ("r-c", "r-s", "r-k"):
            sysctl(r, f"net.ipv4.conf.{dev}.rp_filter", "0")
        # Main table of the router: the service lives on the stable host.
        ip("route", "add", f"{SVC4}/32", "via", "198.18.2.2", netns=r)
        ip("-6", "route", "add", f"{SVC6}/128", "via", "fd00:2::2", netns=r)
        ip("addr", "add", f"{CLIENT4}/24", "dev", "c0", netns=self.client)
        ip("addr", "add", f"{CLIENT6}/64", "dev", "c0", "nodad", netns=self.client)
        ip("route", "add", "default", "via", "198.18.1.1", netns=self.client)
        ip("-6", "route", "add", "default", "via", "fd00:1::1", netns=self.client)
        for host, dev, net in ((self.stable, "s0", "2"), (self.canary, "k0", "3")):
            ip("addr", "add", f"198.18.{net}.2/24", "dev", dev, netns=host)
            ip("addr", "add", f"fd00:{net}::2/64", "dev", dev, "nodad", netns=host)
            ip("addr", "add", f"{SVC4}/32", "dev", "lo", netns=host)
            ip("addr", "add", f"{SVC6}/128", "dev", "lo", netns=host)
            ip("route", "add", "default", "via", f"198.18.{net}.1", netns=host)
            ip("-6", "route", "add", "default", "via", f"fd00:{net}::1", netns=host)

    def policy(
        self, *, canary_mark: int = 0x2, table: int = 102, size: int = 1024, dev: str = "r-k"
    ):
        r = self.router
        return parse_policy(
            textwrap.dedent(f"""
            version: 1
            mark_mask: 0xff
            colors:
              stable: {{mark: 0x1}}
              canary: {{mark: {canary_mark:#x}}}
              dark: {{mark: 0x4}}
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
                    table: {table}
                    routes:
                      - {{dst: 198.18.100.0/24, via: 198.18.3.2}}
                      - {{dst: "fd00:100::/64", via: "fd00:3::2"}}
                      - {{dst: 198.18.200.0/24, dev: {dev}}}
        """),
            "<test>",
        )

    def point(self) -> AttachPoint:
        return AttachPoint("r-c", "ingress", self.router)

    def our_rules(self) -> list[str]:
        out = ip("-4", "rule", netns=self.router) + ip("-6", "rule", netns=self.router)
        return [line.strip() for line in out.splitlines() if "proto 165" in line]

    def our_routes(self) -> list[str]:
        out = ip("-4", "route", "show", "table", "all", netns=self.router) + ip(
            "-6", "route", "show", "table", "all", netns=self.router
        )
        return [line for line in out.splitlines() if "proto 165" in line]

    def assert_clean(self) -> None:
        assert tcm.present(self.point()) == []
        for dev in ("r-c", "r-s"):
            assert "clsact" not in tc("qdisc", "show", "dev", dev, netns=self.router)
        assert self.our_rules() == []
        assert self.our_routes() == []


def fetch(topo: Topo, mgr: DatapathManager | None, color: str | None, svc: str) -> str:
    """One request on a fresh flow, registered with ``color`` before connecting."""
    src = CLIENT6 if ":" in svc else CLIENT4
    with Flow(topo.client, src, svc, PORT) as flow:
        if color is not None and mgr is not None:
            mgr.flow_open(color, flow.local, flow.remote)
        try:
            return flow.connect().ask()
        finally:
            if color is not None and mgr is not None:
                mgr.flow_close(color, flow.local, flow.remote)


async def on_loop(fn, *args):
    return fn(*args)


def packets(mgr: DatapathManager, color: str) -> int:
    return mgr.snapshot().counters.get((color, "ingress"), (0, 0))[0]


@pytest.mark.parametrize("svc", [SVC4, SVC6], ids=["ipv4", "ipv6"])
def test_colored_flows_take_their_color_path(topo, mgr_factory, svc):
    # Without the data path every flow reaches stable (main table).
    assert fetch(topo, None, None, svc) == "stable"
    mgr = mgr_factory(topo.policy())
    mgr.start()
    assert mgr.attached

    assert fetch(topo, mgr, "canary", svc) == "canary"
    assert fetch(topo, mgr, None, svc) == "stable", "an unregistered flow stays on stable"
    assert fetch(topo, mgr, "stable", svc) == "stable"
    assert fetch(topo, mgr, "dark", svc) == "stable", "a color without a table uses main"
    assert fetch(topo, mgr, "no-such-color", svc) == "stable"
    assert packets(mgr, "canary") >= 3  # SYN, ACK, data, FIN...
    assert packets(mgr, "dark") >= 3
    assert mgr.snapshot().evictions == 0

    (f,) = tcm.present(topo.point())
    assert f.name == "traffic-color:ingress"
    assert topo.our_rules() == ["10002:\tfrom all fwmark 0x2/0xff lookup 102 proto 165"] * 2


def test_status_route_debug_and_doctor_on_a_live_data_path(topo, mgr_factory):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    with Flow(topo.client, CLIENT4, SVC4, PORT) as flow:
        mgr.flow_open("canary", flow.local, flow.remote)
        assert flow.connect().ask() == "canary"
        st = mgr.status()
        assert st["flows"]["by_color"] == {"canary": 1}
        mgr.flow_close("canary", flow.local, flow.remote)
    assert mgr.status()["flows"]["in_map"] == 0
    (att,) = st["attach_points"]
    assert (att["interface"], att["direction"], att["netns"]) == ("r-c", "ingress", topo.router)
    assert att["filter"]["pref"] in tags.FILTER_PREFS and att["ifindex"] > 0
    colors = {c["name"]: c for c in st["colors"]}
    assert colors["canary"]["table"] == 102 and colors["canary"]["mark"] == 0x2
    assert colors["stable"]["table"] is None and all(c["live"] for c in colors.values())
    assert len(st["routing"]["rules"]) == 2
    assert st["counters"]["canary"]["ingress"]["packets"] > 0

    canary = mgr.route_debug("canary", SVC4)
    assert canary["table"] == 102 and canary["kernel"]["table"] == 102
    assert canary["kernel"]["gateway"] == "198.18.3.2" and canary["agrees"]
    assert canary["rule"]["fwmark"] == 0x2
    stable = mgr.route_debug("stable", SVC6)
    assert stable["rule"] is None and stable["table_name"] == "main"
    assert stable["kernel"]["table"] == 254 and stable["kernel"]["gateway"] == "fd00:2::2"

    checks = {c.name: c for c in run_doctor(topo.policy())}
    assert checks["filters"].ok, checks["filters"].detail
    assert checks["rp_filter"].ok, checks["rp_filter"].detail
    sysctl(topo.router, "net.ipv4.conf.r-k.rp_filter", "1")
    try:
        rp = next(c for c in run_doctor(topo.policy()) if c.name == "rp_filter")
        assert not rp.ok and "r-k" in rp.detail
    finally:
        sysctl(topo.router, "net.ipv4.conf.r-k.rp_filter", "0")


def test_reload_of_marks_and_tables_re_points_rules_without_recompiling(
    topo, mgr_factory, monkeypatch
):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    prog_ids = mgr.status()["programs"]
    builds = []
    real_build = manager_mod.build_classifier
    monkeypatch.setattr(
        manager_mod, "build_classifier", lambda *a, **k: builds.append(a) or real_build(*a, **k)
    )
    with Flow(topo.client, CLIENT4, SVC4, PORT) as held:
        mgr.flow_open("canary", held.local, held.remote)
        assert held.connect().ask() == "canary"

        # On a thread whose event loop runs, as the runtime's reload does.
        asyncio.run(on_loop(mgr.apply, topo.policy(canary_mark=0x8, table=103)))
        assert builds == []
        assert mgr.status()["programs"] == prog_ids
        assert topo.our_rules() == ["10002:\tfrom all fwmark 0x8/0xff lookup 103 proto 165"] * 2
        assert all(" table 103 " in line for line in topo.our_routes())
        assert held.ask() == "canary", "an open flow follows its color's new mark"
        assert fetch(topo, mgr, "canary", SVC6) == "canary"
        mgr.flow_close("canary", held.local, held.remote)
    assert mgr.route_debug("canary", SVC4)["kernel"]["table"] == 103


def test_reload_of_flow_table_size_swaps_the_filter_and_keeps_open_flows(topo, mgr_factory):
    mgr = mgr_factory(topo.policy(size=1024))
    mgr.start()
    before = mgr.status()
    with Flow(topo.client, CLIENT4, SVC4, PORT) as held:
        mgr.flow_open("canary", held.local, held.remote)
        assert held.connect().ask() == "canary"
        counted = packets(mgr, "canary")

        mgr.apply(topo.policy(size=2048))
        after = mgr.status()
        assert after["flow_table_size"] == 2048
        assert after["programs"]["ingress"]["id"] != before["programs"]["ingress"]["id"]
        (f,) = tcm.present(topo.point())  # exactly one filter of ours, at the other preference
        assert f.pref != before["attach_points"][0]["filter"]["pref"]
        assert after["flows"]["by_color"] == {"canary": 1}, "the open flow was copied"
        assert held.ask() == "canary", "the open flow keeps its color across the swap"
        assert packets(mgr, "canary") > counted, "counters continue, never restart at zero"
        mgr.flow_close("canary", held.local, held.remote)
    assert mgr.snapshot().evictions == 0
    assert fetch(topo, mgr, "canary", SVC6) == "canary"


def test_a_second_start_after_a_crash_replaces_leftovers(topo, mgr_factory):
    run_child(
        textwrap.dedent(f"""
        import os
        from tests.netns.test_manager import Topo
        from sidecar.datapath.manager import DatapathManager
        t = Topo.__new__(Topo)
        t.router = {topo.router!r}
        DatapathManager(t.policy()).start()
        os._exit(0)  # no close(): the kernel keeps our filter, rules and routes
    """)
    )
    assert len(tcm.present(topo.point())) == 1
    assert len(topo.our_rules()) == 2
    mgr = mgr_factory(topo.policy())
    mgr.start()
    assert len(tcm.present(topo.point())) == 1
    assert len(topo.our_rules()) == 2
    assert len(topo.our_routes()) == 3
    assert fetch(topo, mgr, "canary", SVC4) == "canary"
    mgr.close()
    mgr.close()  # twice is fine
    topo.assert_clean()


def test_a_failed_reload_keeps_the_running_data_path(topo, mgr_factory):
    mgr = mgr_factory(topo.policy())
    mgr.start()
    rules, routes = topo.our_rules(), topo.our_routes()
    with pytest.raises(DatapathError) as exc:
        mgr.apply(topo.policy(canary_mark=0x8, table=103, dev="nosuch0"))
    assert exc.value.step == "routes" and "nosuch0" in str(exc.value)
    assert topo.our_rules() == rules and topo.our_routes() == routes
    assert fetch(topo, mgr, "canary", SVC4) == "canary"
    assert mgr.status()["colors"][1]["mark"] == 0x2
