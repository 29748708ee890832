"""Policy validation: every mistake is reported with its line and a reason a person can act on."""

from __future__ import annotations

import textwrap

import pytest

from sidecar.errors import PolicyError
from sidecar.policy import (
    DEFAULT_POLICY_TEXT,
    check_pod_color,
    default_policy,
    parse_address,
    parse_policy,
)

FULL = textwrap.dedent("""\
    version: 1
    header: x-traffic-color
    default_color: stable
    mark_mask: 0xff
    colors:
      stable: {mark: 0x1}
      canary: {mark: 0x2, priority: 90}
      blue: {mark: 0x4, dscp: 10}
    inbound:
      listen: "0.0.0.0:15006"
      app: "127.0.0.1:8080"
      trust_header: false
      trusted_sources: ["10.0.0.0/8", "fd00::/8"]
      rules:
        - match: {header: {name: X-User-Group, value: beta}}
          color: canary
        - match: {cookie: {name: lane, value: canary}}
          color: canary
        - split: {canary: 10, blue: 5}
          sticky_key: header:x-user-id
    outbound:
      listen: "127.0.0.1:15001"
    admin:
      listen: "[::]:15090"
    timeouts: {header_read: 5, idle: 30.5, upstream_read: 15}
    datapath:
      enabled: true
      required: false
      flow_table_size: 1024
      attach:
        - {interface: eth0, direction: egress}
        - {interface: veth-pod1, direction: ingress, netns: /var/run/netns/node}
      routing:
        netns: /var/run/netns/node
        colors:
          canary:
            table: 102
            routes:
              - {dst: "10.96.0.10/32", via: "10.0.3.2"}
              - {dst: "fd00:96::10/128", via: "fd00:3::2"}
    """)


def errors_of(text: str) -> list[tuple[int, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return [(i.line, i.message) for i in info.value.issues]


def test_full_policy_parses_into_the_model() -> None:
    p = parse_policy(FULL, "p.yaml")
    assert [(c.name, c.id, c.mark) for c in p.colors.values()] == [
        ("stable", 1, 1),
        ("canary", 2, 2),
        ("blue", 3, 4),
    ]
    assert p.colors["canary"].priority == 90 and p.colors["blue"].dscp == 10
    assert p.inbound.trust_header is False
    assert [str(n) for n in p.inbound.trusted_sources] == ["10.0.0.0/8", "fd00::/8"]
    header_rule, cookie_rule, split_rule = p.inbound.rules
    assert header_rule.match.header == ("x-user-group", "beta")  # names compare lower-case
    assert cookie_rule.match.cookie == ("lane", "canary")
    assert split_rule.split == (("canary", 10), ("blue", 5))
    assert (split_rule.sticky_key.source, split_rule.sticky_key.name) == ("header", "x-user-id")
    assert str(p.admin_listen) == "[::]:15090"
    assert p.timeouts.header_read == 5.0 and p.timeouts.drain == 10.0
    assert p.timeouts.upstream_read == 15.0
    dp = p.datapath
    assert dp.enabled and dp.flow_table_size == 1024
    assert dp.attach[1].netns == "/var/run/netns/node"
    assert dp.routing.colors["canary"].table == 102
    assert [str(r.via) for r in dp.routing.colors["canary"].routes] == ["10.0.3.2", "fd00:3::2"]


def test_default_policy_is_valid_and_stable_by_default() -> None:
    p = default_policy()
    assert p.default_color == "stable" and set(p.colors) == {"stable", "canary"}
    assert not p.datapath.enabled
    assert p.digest == parse_policy(DEFAULT_POLICY_TEXT).digest


@pytest.mark.parametrize(
    ("snippet", "line", "fragment"),
    [
        ("version: 1\ncolors:\n  stable: {mark: 1\n", 4, "mapping started at line 3"),
        ("version: 1\ncolour: {}\n", 2, "unknown key 'colour'"),
        ("version: 2\n", 1, "version: 2 is not supported"),
        ("colors:\n  stable: {mark: '1'}\n", 2, "expected an integer"),
        ("colors:\n  stable: {mark: 0x100}\n", 2, "outside mark_mask"),
        ("colors:\n  stable: {mark: 1}\n  canary: {mark: 1}\n", 3, "duplicate mark 0x1"),
        ("colors:\n  Stable: {mark: 1}\n", 2, "color name 'Stable' is invalid"),
        ("colors:\n  stable: {priority: 3}\n", 2, "'mark' is required"),
        ("colors:\n  stable: {mark: 1, dscp: 64}\n", 2, "out of range"),
        ("default_color: gold\n", 1, "'gold' is not defined"),
        (
            "inbound:\n  rules:\n    - match: {header: {name: a, value: b}}\n      color: red\n",
            4,
            "color 'red' is not defined",
        ),
        (
            "inbound:\n  rules:\n    - split: {canary: 60, stable: 50}\n"
            "      sticky_key: header:u\n",
            3,
            "add up to 110",
        ),
        ("inbound:\n  rules:\n    - split: {canary: 10}\n", 3, "needs 'sticky_key'"),
        (
            "inbound:\n  rules:\n    - split: {canary: 10}\n      sticky_key: query:u\n",
            4,
            "header:NAME or cookie:NAME",
        ),
        ("inbound:\n  trusted_sources: [10.0.0.0/33]\n", 2, "not a CIDR"),
        ("inbound:\n  listen: 15006\n", 2, "expected a string"),
        ("inbound:\n  listen: 'localhost'\n", 2, "not HOST:PORT"),
        (
            "datapath:\n  attach:\n    - {interface: eth0, direction: sideways}\n",
            3,
            "ingress or egress",
        ),
        ("datapath:\n  routing:\n    colors:\n      canary: {table: 254}\n", 4, "reserved"),
        (
            "datapath:\n  routing:\n    colors:\n      canary:\n        table: 7\n        routes:\n"
            "          - {dst: 10.0.0.1/8, via: 10.0.0.1}\n",
            7,
            "not a network",
        ),
        (
            "datapath:\n  routing:\n    colors:\n      canary:\n        table: 7\n        routes:\n"
            "          - {dst: 10.0.0.0/8, via: 'fd00::1'}\n",
            7,
            "IPv6 gateway",
        ),
        ("datapath:\n  enabled: yes please\n", 2, "expected true or false"),
        ("timeouts: {idle: -1}\n", 1, "positive number"),
    ],
)
def test_each_mistake_is_reported_at_its_line(snippet: str, line: int, fragment: str) -> None:
    found = errors_of(snippet)
    assert any(ln == line and fragment in msg for ln, msg in found), found


def test_all_issues_are_reported_at_once_in_line_order() -> None:
    text = "colors:\n  stable: {mark: 1}\n  canary: {mark: 1}\nbogus: 1\ndefault_color: x\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "cm/policy.yaml")
    rendered = info.value.format().splitlines()
    assert rendered == [
        "cm/policy.yaml:3: colors.canary.mark: duplicate mark 0x1 (also used by 'stable')",
        "cm/policy.yaml:4: policy: unknown key 'bogus' (expected one of: admin, baggage, "
        "capture, colors, datapath, default_color, header, inbound, mark_mask, outbound, "
        "timeouts, version)",
        "cm/policy.yaml:5: default_color: 'x' is not defined under colors",
    ]


def test_a_broken_color_is_reported_once_not_again_where_it_is_used() -> None:
    text = textwrap.dedent("""\
        default_color: canary
        colors:
          stable: {mark: 0x1}
          canary: {mark: 0x1}
        inbound:
          rules:
            - split: {canary: 120}
              sticky_key: header:x-user-id
            - match: {header: {name: x-beta, value: "1"}}
              color: canary
        """)
    assert errors_of(text) == [
        (4, "colors.canary.mark: duplicate mark 0x1 (also used by 'stable')"),
        (7, "inbound.rules[0].split.canary: 120 is out of range [0, 100]"),
    ]


def test_empty_and_non_mapping_files_are_rejected() -> None:
    assert errors_of("")[0][1].startswith("empty policy")
    assert "expected a mapping" in errors_of("- a\n- b\n")[0][1]


def test_pod_color_must_be_defined() -> None:
    p = default_policy()
    assert check_pod_color(p, "stable") is None
    assert "not defined" in check_pod_color(p, "gold")
    assert "not a valid color name" in check_pod_color(p, "Gold!")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:15001", ("::1", 15001)),
        ("svc.local:8080", ("svc.local", 8080)),
        ("::1:80", None),
        ("[zz]:1", None),
        ("1.2.3.4:0", None),
        ("1.2.3.4:70000", None),
        (":80", None),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int] | None) -> None:
    addr = parse_address(text)
    assert (None if addr is None else (addr.host, addr.port)) == expected


def test_listen_addresses_may_ask_for_any_port_but_the_app_may_not() -> None:
    p = parse_policy('outbound: {listen: "127.0.0.1:0"}\n')
    assert p.outbound_listen.port == 0
    assert "not HOST:PORT" in errors_of('inbound: {app: "127.0.0.1:0"}\n')[0][1]
