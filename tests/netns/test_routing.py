"""Policy routing in a real namespace: `ip rule` / `ip route` as an operator would read them."""

from __future__ import annotations

import socket
import textwrap

import pytest

from sidecar.datapath import routing
from sidecar.datapath.child import routing as rt
from sidecar.datapath.child.netlink import ipr_in
from sidecar.errors import DatapathError
from sidecar.policy import parse_policy
from tests.netns.netnsutil import Lab, ip, run_child


def make_policy(
    netns: str | None, *, mark: int = 0x2, table: int = 102, extra_routes: str = ""
) -> object:
    return parse_policy(
        textwrap.dedent(f"""
        version: 1
        mark_mask: 0xff
        colors:
          stable: {{mark: 0x1}}
          canary: {{mark: {mark:#x}}}
        datapath:
          enabled: true
          routing:
            netns: {netns}
            rule_priority: 10000
            colors:
              canary:
                table: {table}
                routes:
                  - {{dst: 198.18.100.0/24, via: 198.18.3.2}}
                  - {{dst: "fd00:100::/64", via: "fd00:3::2"}}
                  - {{dst: 198.18.101.0/24, dev: eth0}}
        {extra_routes}
    """)
    )


# ------------------------------------------------------------- pure parts


def test_desired_rules_one_per_family_for_colors_with_a_table():
    p = make_policy("x")
    rules = routing.desired_rules(p)
    assert [(r.family, r.priority, r.fwmark, r.fwmask, r.table) for r in rules] == [
        (socket.AF_INET, 10002, 0x2, 0xFF, 102),
        (socket.AF_INET6, 10002, 0x2, 0xFF, 102),
    ]  # stable has no table: no rule, main table


def test_desired_routes_carry_gateway_or_device():
    routes = routing.desired_routes(make_policy("x"))
    assert {(r.dst, r.dst_len, r.gateway, r.dev, r.table) for r in routes} == {
        ("198.18.100.0", 24, "198.18.3.2", None, 102),
        ("198.18.101.0", 24, None, "eth0", 102),
        ("fd00:100::", 64, "fd00:3::2", None, 102),
    }


# ----------------------------------------------------------- kernel parts


@pytest.fixture
def router():
    """A namespace with eth0 addressed in v4 and v6 (the gateways' subnet)."""
    with Lab() as lab:
        a, b = lab.netns(), lab.netns()
        lab.veth(a, "eth0", b, "eth0")
        ip("addr", "add", "198.18.3.1/24", "dev", "eth0", netns=a)
        ip("addr", "add", "fd00:3::1/64", "dev", "eth0", "nodad", netns=a)
        yield a


def rule_lines(netns: str, v6: bool = False) -> list[str]:
    out = ip(*(("-6",) if v6 else ()), "rule", "show", netns=netns)
    return [line.strip() for line in out.splitlines() if line.strip()]


def route_lines(netns: str, table: int, v6: bool = False) -> list[str]:
    out = ip(*(("-6",) if v6 else ()), "route", "show", "table", str(table), netns=netns)
    return [line.strip() for line in out.splitlines() if line.strip()]


def apply(netns: str, policy) -> rt.Changes:
    with ipr_in(netns) as ipr:
        return rt.reconcile(
            ipr, routing.desired_rules(policy), routing.desired_routes(policy), netns
        )


@pytest.mark.root
def test_rules_and_routes_are_installed_tagged_and_foreign_ones_survive(router):
    a = router
    ip("rule", "add", "priority", "9000", "fwmark", "0x5/0xff", "lookup", "200", netns=a)
    ip("route", "add", "198.18.102.0/24", "via", "198.18.3.9", "table", "102", netns=a)
    apply(a, make_policy(a))

    for v6 in (False, True):
        ours = [line for line in rule_lines(a, v6) if "proto 165" in line]
        assert ours == ["10002:\tfrom all fwmark 0x2/0xff lookup 102 proto 165"], ours
    assert any(line.startswith("9000:") for line in rule_lines(a))
    v4 = route_lines(a, 102)
    assert "198.18.100.0/24 via 198.18.3.2 dev eth0 proto 165" in v4
    assert "198.18.101.0/24 dev eth0 proto 165 scope link" in v4
    assert any(
        line.startswith("fd00:100::/64 via fd00:3::2 dev eth0 proto 165")
        for line in route_lines(a, 102, v6=True)
    )

    with ipr_in(a) as ipr:
        got = rt.route_get(ipr, "198.18.100.7", 0x2)
        assert (got["table"], got["gateway"]) == (102, "198.18.3.2")
        assert rt.route_get(ipr, "fd00:100::7", 0x2)["table"] == 102
        assert rt.remove_all(ipr, a) == 5
    assert not any("proto 165" in line for line in rule_lines(a) + rule_lines(a, True))
    assert route_lines(a, 102) == ["198.18.102.0/24 via 198.18.3.9 dev eth0"]
    assert any(line.startswith("9000:") for line in rule_lines(a))


@pytest.mark.root
def test_reload_re_points_rules_and_drops_the_old_ones(router):
    a = router
    apply(a, make_policy(a))
    changes = apply(a, make_policy(a, mark=0x8, table=103))
    assert changes.removed == 2 + 3  # two rules, three routes of table 102
    ours = [line for line in rule_lines(a) if "proto 165" in line]
    assert ours == ["10002:\tfrom all fwmark 0x8/0xff lookup 103 proto 165"]
    assert route_lines(a, 102) == []
    assert len(route_lines(a, 103)) == 2
    assert apply(a, make_policy(a, mark=0x8, table=103)) == rt.Changes(0, 0)


@pytest.mark.root
def test_leftovers_of_a_crashed_run_are_adopted_not_duplicated(router):
    a = router
    # A run that installed the policy and died without cleaning up.
    run_child(
        textwrap.dedent(f"""
        import os
        from sidecar.datapath import routing
        from sidecar.datapath.child import routing as rt
        from sidecar.datapath.child.netlink import ipr_in
        from tests.netns.test_routing import make_policy
        p = make_policy({a!r})
        with ipr_in({a!r}) as ipr:
            rt.reconcile(ipr, routing.desired_rules(p), routing.desired_routes(p), {a!r})
        os._exit(0)
    """)
    )
    before = rule_lines(a)
    changes = apply(a, make_policy(a))
    assert changes == rt.Changes(0, 0)
    assert rule_lines(a) == before
    assert sum("proto 165" in line for line in rule_lines(a)) == 1
    assert len(route_lines(a, 102)) == 2

    # A crashed run with another policy: its rule at another mark is replaced.
    run_child(
        textwrap.dedent(f"""
        from sidecar.datapath import routing
        from sidecar.datapath.child import routing as rt
        from sidecar.datapath.child.netlink import ipr_in
        from tests.netns.test_routing import make_policy
        p = make_policy({a!r}, mark=0x4)
        with ipr_in({a!r}) as ipr:
            rt.reconcile(ipr, routing.desired_rules(p), routing.desired_routes(p), {a!r})
    """)
    )
    apply(a, make_policy(a))
    assert [line for line in rule_lines(a) if "proto 165" in line] == [
        "10002:\tfrom all fwmark 0x2/0xff lookup 102 proto 165"
    ]


@pytest.mark.root
def test_foreign_route_in_our_table_is_an_error_not_overwritten(router):
    a = router
    ip("route", "add", "198.18.100.0/24", "via", "198.18.3.9", "table", "102", netns=a)
    with pytest.raises(DatapathError) as exc:
        apply(a, make_policy(a))
    assert exc.value.step == "routes" and "did not install" in str(exc.value)
    assert route_lines(a, 102)[0] == "198.18.100.0/24 via 198.18.3.9 dev eth0"


@pytest.mark.root
def test_route_on_a_missing_device_names_it(router):
    a = router
    p = parse_policy(
        textwrap.dedent(f"""
        version: 1
        colors: {{stable: {{mark: 0x1}}, canary: {{mark: 0x2}}}}
        datapath:
          enabled: true
          routing:
            netns: {a}
            colors:
              canary:
                table: 102
                routes: [{{dst: 198.18.100.0/24, dev: nosuch0}}]
    """)
    )
    with pytest.raises(DatapathError) as exc:
        apply(a, p)
    assert exc.value.step == "routes" and "nosuch0" in str(exc.value)
    assert not any("proto 165" in line for line in rule_lines(a)), "no rule to an empty table"
