"""The node section of a policy: the agent's interfaces, restore value and admin port."""

from __future__ import annotations

import textwrap

import pytest

from sidecar.errors import PolicyError
from sidecar.policy import DEFAULT_NODE_ADMIN, Address, default_policy, parse_policy

NODE = textwrap.dedent("""\
    version: 1
    mark_mask: 0xff
    colors:
      stable: {mark: 0x1, dscp: 8}
      canary: {mark: 0x2, dscp: 10, priority: 5}
      plain: {mark: 0x4}
    datapath:
      routing:
        colors:
          canary: {table: 102}
    node:
      interfaces: ["veth*", "cali*", lxc-pod1]
      restore_dscp: 0
      admin_listen: "127.0.0.1:16091"
    """)


def test_node_section_parses():
    p = parse_policy(NODE, "n.yaml")
    assert p.node.interfaces == ("veth*", "cali*", "lxc-pod1")
    assert p.node.restore_dscp == 0
    assert p.node.admin_listen == Address("127.0.0.1", 16091)


def test_without_a_node_section_nothing_changes():
    p = default_policy()
    assert p.node.interfaces == ()
    assert p.node.restore_dscp is None
    assert str(p.node.admin_listen) == DEFAULT_NODE_ADMIN


def _issues(text: str) -> list[tuple[int, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "n.yaml")
    return [(i.line, i.message) for i in info.value.issues]


@pytest.mark.parametrize(
    ("old", "new", "line", "words"),
    [
        ("restore_dscp: 0", "restore_dscp: 64", 13, "out of range [0, 63]"),
        ("restore_dscp: 0", "restore_dscp: 10", 13, "is the DSCP of 'canary'"),
        ('"cali*"', '"a/b"', 12, "not an interface name or glob"),
        ("interfaces: [", "interfaces: {a: 1}\n  x: [", 12, "expected a list"),
        ("dscp: 10,", "dscp: 8,", 5, "also the DSCP of 'stable'"),
        ("dscp: 8}", "dscp: 0}", 4, "every unmarked packet carries"),
        ('admin_listen: "127.0.0.1:16091"', "admin_listen: nope", 14, "is not HOST:PORT"),
        ("restore_dscp: 0", "restore: 0", 13, "unknown key 'restore'"),
    ],
)
def test_bad_node_sections_name_line_and_reason(old, new, line, words):
    found = _issues(NODE.replace(old, new, 1))
    assert any(ln == line and words in msg for ln, msg in found), found


def test_a_node_needs_colors_with_dscp():
    text = NODE.replace(", dscp: 8", "").replace(", dscp: 10", "")
    assert any(ln == 11 and "no color has a dscp" in msg for ln, msg in _issues(text)), _issues(
        text
    )


def test_duplicate_dscp_is_fine_without_a_node_section():
    text = NODE.split("node:")[0].replace("dscp: 10,", "dscp: 8,")
    assert parse_policy(text, "pod.yaml").colors["canary"].dscp == 8
