"""The capture ruleset as data: what is redirected where, what is left alone. No kernel."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from sidecar.datapath.capture import FAMILY, TABLE, Ports, removal, ruleset
from sidecar.errors import PolicyError
from sidecar.policy import DEFAULT_OPAQUE_PORTS, Capture, parse_policy

PORTS = Ports(outbound=15001, inbound=15006, admin=15090)


def _policy(capture_yaml: str, extra: str = ""):
    text = (
        "version: 1\n" + extra + "capture:\n" + textwrap.indent(textwrap.dedent(capture_yaml), "  ")
    )
    return parse_policy(text, "p.yaml")


def _rules(cmds: dict, chain: str) -> list[list[dict]]:
    return [
        c["add"]["rule"]["expr"]
        for c in cmds["nftables"]
        if "add" in c and "rule" in c["add"] and c["add"]["rule"]["chain"] == chain
    ]


def _returns(rules: list[list[dict]]) -> list[dict]:
    """The match of each ``MATCH return`` rule."""
    return [r[0]["match"] for r in rules if r[-1] == {"return": None}]


def test_one_table_of_ours_replaced_in_one_transaction():
    cmds = ruleset(Capture(enabled=True), PORTS)["nftables"]
    table = {"family": FAMILY, "name": TABLE}
    # add + delete + add: a leftover table is replaced, a missing one is no error.
    assert cmds[1:4] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    tables = {json_table(c) for c in cmds if json_table(c)}
    assert tables == {(FAMILY, TABLE)}, "only our table is ever named"
    hooks = {c["add"]["chain"]["hook"] for c in cmds if "chain" in c.get("add", {})}
    assert hooks == {"output", "prerouting"}
    assert removal()["nftables"][1:] == [{"add": {"table": table}}, {"delete": {"table": table}}]


def json_table(cmd: dict) -> tuple[str, str] | None:
    for verb in ("add", "delete"):
        body = cmd.get(verb, {})
        for kind, obj in body.items():
            return (obj["family"], obj["table"] if kind != "table" else obj["name"])
    return None


def test_outbound_redirects_tcp_to_the_outbound_listener_last():
    rules = _rules(ruleset(Capture(enabled=True), PORTS), "output")
    assert rules[-1][-1] == {"redirect": {"port": 15001}}
    assert rules[-1][0] == {
        "match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}
    }


def test_outbound_never_captures_loopback_the_sidecar_uid_or_its_marked_sockets():
    cap = Capture(enabled=True, owner_uid=4242, own_mark=0x100000)
    matches = _returns(_rules(ruleset(cap, PORTS), "output"))
    assert {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"} in matches
    assert {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 4242} in matches
    assert {
        "op": "==",
        "left": {"&": [{"meta": {"key": "mark"}}, 0x100000]},
        "right": 0x100000,
    } in matches


def test_excluded_ports_and_cidrs_return_before_the_redirect_per_family():
    p = _policy("""\
        enabled: true
        outbound:
          exclude_ports: [22, 3306]
          include_cidrs: ["10.0.0.0/8"]
          exclude_cidrs: ["10.1.0.0/16", "fd00:1::/64"]
        """)
    matches = _returns(_rules(ruleset(p.capture, PORTS), "output"))
    dport = {"payload": {"protocol": "tcp", "field": "dport"}}
    assert {"op": "==", "left": dport, "right": {"set": [22, 3306]}} in matches
    v4 = {"payload": {"protocol": "ip", "field": "daddr"}}
    v6 = {"payload": {"protocol": "ip6", "field": "daddr"}}
    assert {"op": "==", "left": v4, "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}} in matches
    assert {"op": "==", "left": v6, "right": {"prefix": {"addr": "fd00:1::", "len": 64}}} in matches
    assert {"op": "!=", "left": v4, "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}} in matches
    # Only IPv4 destinations were included: IPv6 is left alone entirely.
    assert {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"} in matches


def test_without_include_cidrs_every_destination_of_both_families_is_captured():
    matches = _returns(_rules(ruleset(Capture(enabled=True), PORTS), "output"))
    assert not [
        m for m in matches if "payload" in m["left"] or m["left"] == {"meta": {"key": "nfproto"}}
    ]


def test_inbound_keeps_admin_listener_and_excluded_ports_out():
    p = _policy("enabled: true\ninbound: {exclude_ports: [9000]}\n")
    rules = _rules(ruleset(p.capture, PORTS), "prerouting")
    assert rules[-1][-1] == {"redirect": {"port": 15006}}
    dport = {"payload": {"protocol": "tcp", "field": "dport"}}
    kept = [m["right"] for m in _returns(rules) if m["left"] == dport]
    assert kept == [{"set": [9000, 15001, 15006, 15090]}]
    assert {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"} in _returns(rules)


def test_capture_section_defaults_and_keys():
    p = _policy("enabled: true\nowner_uid: 2000\ndetect_timeout: 0.5\nopaque_ports: [7000]\n")
    c = p.capture
    assert (c.enabled, c.owner_uid, c.detect_timeout, c.opaque_ports) == (True, 2000, 0.5, (7000,))
    d = parse_policy("version: 1\n").capture
    assert (d.enabled, d.owner_uid, d.opaque_ports) == (False, 1337, DEFAULT_OPAQUE_PORTS)
    assert d.own_mark & 0xFF == 0, "the default own mark stays clear of the colors' marks"
    assert _policy("outbound: {include_cidrs: [fd00::/8]}\n").capture.outbound.include_cidrs == (
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize(
    ("snippet", "line", "fragment"),
    [
        ("enabled: yes-please\n", 4, "capture.enabled: expected true or false"),
        ("owner_uid: 0\n", 4, "capture.owner_uid: 0x0 is out of range"),
        ("outbound:\n  exclude_ports: [22, 70000]\n", 5, "exclude_ports[]: 70000 is out of range"),
        ("outbound:\n  exclude_cidrs: [nope]\n", 5, "'nope' is not a CIDR"),
        ("inbound: {exclude_ports: 8080}\n", 4, "capture.inbound.exclude_ports: expected a list"),
        ("own_mark: 0x3\n", 4, "shares bits with mark_mask 0xff"),
        ("detect_timeout: 0\n", 4, "capture.detect_timeout: expected a positive number"),
        ("redirect: all\n", 4, "capture: unknown key 'redirect'"),
    ],
)
def test_capture_mistakes_are_reported_at_their_line(snippet, line, fragment):
    with pytest.raises(PolicyError) as info:
        _policy(snippet, extra="mark_mask: 0xff\n")
    issues = info.value.issues
    assert any(i.line == line and fragment in i.message for i in issues), issues


def test_a_mark_mask_covering_the_default_own_mark_is_refused_when_capture_is_on():
    with pytest.raises(PolicyError, match="covers the default own_mark"):
        _policy("enabled: true\n", extra="mark_mask: 0xffffffff\n")
    assert _policy("enabled: false\n", extra="mark_mask: 0xffffffff\n").capture.enabled is False
