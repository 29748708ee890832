"""Coloring decisions, without sockets: which color, and why the header was rewritten."""

from __future__ import annotations

import textwrap

import pytest

from sidecar.coloring import (
    MALFORMED,
    MISSING,
    REPEATED,
    SPLIT_BUCKETS,
    UNKNOWN,
    UNTRUSTED,
    Colorer,
    parse_cookies,
    split_bucket,
)
from sidecar.policy import parse_policy

BASE = """\
colors:
  stable: {mark: 1}
  canary: {mark: 2}
  blue: {mark: 4}
inbound:
  trust_header: %(trust)s
  trusted_sources: ["10.1.0.0/16", "fd00:1::/64"]
  rules:
    - match: {header: {name: x-user-group, value: beta}}
      color: canary
    - match: {cookie: {name: lane, value: blue}}
      color: blue
    - split: {canary: %(pct)d}
      sticky_key: header:x-user-id
"""


def colorer(trust: bool = True, pct: int = 10, pod: str = "stable") -> Colorer:
    text = BASE % {"trust": "true" if trust else "false", "pct": pct}
    return Colorer(parse_policy(text), pod)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"canary"], ("canary", None)),
        ([b" blue\t"], ("blue", None)),
        ([], ("stable", MISSING)),
        ([b"purple"], ("stable", UNKNOWN)),
        ([b"Canary"], ("stable", MALFORMED)),
        ([b"can ary"], ("stable", MALFORMED)),
        ([b"\xffcanary"], ("stable", MALFORMED)),
        ([b""], ("stable", MALFORMED)),
        ([b"canary", b"canary"], ("stable", REPEATED)),
        ([b"canary,blue"], ("stable", REPEATED)),
    ],
)
def test_outbound_keeps_one_known_color_and_replaces_anything_else(values, expected) -> None:
    assert colorer().outbound(values) == expected


def test_outbound_uses_the_pods_color() -> None:
    assert colorer(pod="canary").outbound([]) == ("canary", MISSING)
    assert colorer(pod="canary").outbound([b"gold"]) == ("canary", UNKNOWN)


def test_inbound_trusted_known_color_wins_over_rules() -> None:
    c = colorer()
    got = c.inbound([b"blue"], {b"x-user-group": [b"beta"]}, trusted=True)
    assert got == ("blue", None)


def test_inbound_rules_decide_when_no_valid_color_came() -> None:
    c = colorer()
    assert c.inbound([], {b"x-user-group": [b"beta"]}, True) == ("canary", MISSING)
    assert c.inbound([b"gold"], {b"x-user-group": [b"beta"]}, True) == ("canary", UNKNOWN)
    assert c.inbound([], {b"cookie": [b"a=1; lane=blue"]}, True) == ("blue", MISSING)
    assert c.inbound([], {b"x-user-group": [b"alpha"]}, True) == ("stable", MISSING)


def test_inbound_untrusted_header_is_stripped_even_when_valid() -> None:
    c = colorer(trust=False)
    assert not c.peer_trusted("192.0.2.7")
    assert c.inbound([b"canary"], {}, trusted=False) == ("stable", UNTRUSTED)
    # rules still apply at the edge
    assert c.inbound([b"canary"], {b"x-user-group": [b"beta"]}, False) == ("canary", UNTRUSTED)


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("fd00:1::5", True),
        ("::ffff:10.1.0.9", True),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
        (None, False),
    ],
)
def test_trusted_sources(peer, trusted) -> None:
    assert colorer(trust=False).peer_trusted(peer) is trusted


def test_only_headers_the_rules_read_are_captured() -> None:
    assert colorer().inbound_capture == {b"x-user-group", b"cookie", b"x-user-id"}


def test_split_is_sticky_and_close_to_its_percent() -> None:
    c = colorer(pct=10)
    users = [f"user-{i}".encode() for i in range(20_000)]
    first = [c.by_rules({b"x-user-id": [u]}) for u in users]
    again = [c.by_rules({b"x-user-id": [u]}) for u in users]
    assert first == again  # sticky: same key, same color
    share = first.count("canary") / len(users)
    assert 0.09 < share < 0.11, share
    assert set(first) == {"canary", None}  # the rest falls through to the pod's color


def test_raising_a_percent_only_moves_keys_into_that_color() -> None:
    users = [f"u{i}".encode() for i in range(5000)]
    for low, high in ((10, 20), (20, 50), (0, 1), (99, 100)):
        c_low, c_high = colorer(pct=low), colorer(pct=high)
        before = {u for u in users if c_low.by_rules({b"x-user-id": [u]}) == "canary"}
        after = {u for u in users if c_high.by_rules({b"x-user-id": [u]}) == "canary"}
        assert before <= after, (low, high)
        assert len(after) > len(before) or high - low <= 1


def test_split_in_second_place_also_only_grows() -> None:
    def policy(blue: int) -> Colorer:
        text = (
            "colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\n  blue: {mark: 4}\n"
            "inbound:\n  rules:\n"
            f"    - split: {{canary: 30, blue: {blue}}}\n      sticky_key: cookie:uid\n"
        )
        return Colorer(parse_policy(text), "stable")

    users = [f"uid={i}".encode() for i in range(3000)]
    for low, high in ((5, 10), (10, 40)):
        p_low, p_high = policy(low), policy(high)
        b1 = {u for u in users if p_low.by_rules({b"cookie": [u]}) == "blue"}
        b2 = {u for u in users if p_high.by_rules({b"cookie": [u]}) == "blue"}
        c1 = {u for u in users if p_low.by_rules({b"cookie": [u]}) == "canary"}
        c2 = {u for u in users if p_high.by_rules({b"cookie": [u]}) == "canary"}
        assert b1 < b2 and c1 == c2


def test_a_request_without_key_falls_through() -> None:
    c = colorer(pct=100)
    assert c.by_rules({}) is None
    assert c.by_rules({b"x-user-id": [b"  "]}) is None
    assert c.by_rules({b"x-user-id": [b"anyone"]}) == "canary"


def test_split_bucket_is_stable_across_processes() -> None:
    # A fixed key must land in a fixed bucket in every replica and every release.
    assert split_bucket(b"user-42") == split_bucket(b"user-42")
    assert 0 <= split_bucket(b"user-42") < SPLIT_BUCKETS
    assert len({split_bucket(f"k{i}".encode()) for i in range(1000)}) > 900


def test_parse_cookies() -> None:
    assert parse_cookies([b'a=1; lane="blue"', b"lane=red; b=2"]) == {
        b"a": b"1",
        b"lane": b"blue",
        b"b": b"2",
    }
    assert parse_cookies([b"junk; =x; y"]) == {}


def test_colorer_rejects_an_undefined_pod_color() -> None:
    with pytest.raises(ValueError, match="gold"):
        Colorer(parse_policy(textwrap.dedent(BASE % {"trust": "true", "pct": 1})), "gold")


def _split_colorer(split: str) -> Colorer:
    text = (
        "colors:\n  stable: {mark: 1}\n  a: {mark: 2}\n  b: {mark: 4}\n  c: {mark: 8}\n"
        f"inbound:\n  rules:\n    - split: {split}\n      sticky_key: header:x-user-id\n"
    )
    return Colorer(parse_policy(text), "stable")


def _assign(c: Colorer, users: list[bytes]) -> dict[bytes, str | None]:
    return {u: c.by_rules({b"x-user-id": [u]}) for u in users}


def test_moving_share_between_two_colors_keeps_the_third_ones_keys() -> None:
    # The example: a 10 -> 20, c 70 -> 60, b stays at 20.
    users = [f"user-{i}".encode() for i in range(50_000)]
    before = _assign(_split_colorer("{a: 10, b: 20, c: 70}"), users)
    after = _assign(_split_colorer("{a: 20, b: 20, c: 60}"), users)
    moved = {(before[u], after[u]) for u in users if before[u] != after[u]}
    assert moved == {("c", "a")}  # keys move only out of the lowered, into the raised
    b_before = {u for u in users if before[u] == "b"}
    assert b_before == {u for u in users if after[u] == "b"}
    for color, share in (("a", 0.2), ("b", 0.2), ("c", 0.6)):
        got = sum(1 for u in users if after[u] == color) / len(users)
        assert abs(got - share) < 0.01, (color, got)
    assert 0.09 < sum(1 for u in users if before[u] != after[u]) / len(users) < 0.11


def test_a_second_color_raised_into_the_unowned_share_keeps_the_others() -> None:
    users = [f"u{i}".encode() for i in range(20_000)]
    before = _assign(_split_colorer("{a: 10, b: 5, c: 20}"), users)
    after = _assign(_split_colorer("{a: 10, b: 25, c: 20}"), users)
    moved = {(before[u], after[u]) for u in users if before[u] != after[u]}
    assert moved == {(None, "b")}  # from the pod's own share only


def test_what_the_layout_does_not_promise() -> None:
    # Lowering the first color moves the third (listed after it at the same end);
    # the docstring of _ranges says why no layout can avoid every such case.
    users = [f"u{i}".encode() for i in range(5000)]
    before = _assign(_split_colorer("{a: 20, b: 20, c: 20}"), users)
    after = _assign(_split_colorer("{a: 10, b: 20, c: 20}"), users)
    assert {u for u in users if before[u] == "b"} == {u for u in users if after[u] == "b"}
    assert {u for u in users if before[u] == "c"} != {u for u in users if after[u] == "c"}
