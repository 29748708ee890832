"""The color in W3C Baggage: reading under the header's trust rules, writing byte for byte."""

from __future__ import annotations

import tracemalloc

import pytest

from sidecar import baggage
from sidecar.coloring import MISSING, UNKNOWN, UNTRUSTED, Colorer
from sidecar.policy import parse_policy

POLICY = """\
colors:
  stable: {mark: 1}
  canary: {mark: 2}
baggage:
  key: traffic-color
"""


def colorer(pod: str = "stable") -> Colorer:
    return Colorer(parse_policy(POLICY), pod)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"a=1"], [b"a=1"]),
        ([b" a = 1 ;p;q=2 , b=%20x "], [b"a = 1 ;p;q=2", b"b=%20x"]),
        ([b"a=1", b"b=2"], [b"a=1", b"b=2"]),
        ([b"a=1,,b=2"], [b"a=1", b"b=2"]),  # empty list elements are no members
        ([b"a=1,b"], None),  # a member without '='
        ([b"a b=1"], None),
        ([b'a="1"'], None),  # DQUOTE is not a baggage-octet
        ([b"a=1\\"], None),
        ([b"a=\xff"], None),
        ([b",".join(b"k%d=v" % i for i in range(64))], [b"k%d=v" % i for i in range(64)]),
        ([b",".join(b"k%d=v" % i for i in range(65))], None),  # 64 members at most
        ([b"a=" + b"x" * 8190], [b"a=" + b"x" * 8190]),  # 8192 bytes
        ([b"a=" + b"x" * 8191], None),
    ],
)
def test_members_follow_the_w3c_grammar_and_limits(values, expected) -> None:
    assert baggage.members(values) == expected


def test_member_value_decodes_and_spots_disagreeing_repeats() -> None:
    found = baggage.members([b"a=1,traffic-color=can%61ry;prop,b=2"])
    assert baggage.member_value(found, b"traffic-color") == (b"canary", True)
    found = baggage.members([b"traffic-color=canary,traffic-color=stable"])
    assert baggage.member_value(found, b"traffic-color")[1] is False
    assert baggage.member_value([b"a=1"], b"traffic-color") == (None, True)


def test_writing_keeps_other_members_in_order_byte_for_byte() -> None:
    found = baggage.members([b"userId=al%20ice ; p = 1,traffic-color=stable,isProduction=false"])
    out = baggage.with_color(found, b"traffic-color", b"canary")
    assert out == b"userId=al%20ice ; p = 1,traffic-color=canary,isProduction=false"
    assert baggage.with_color([b"a=1"], b"traffic-color", b"canary") == b"a=1,traffic-color=canary"
    assert baggage.with_color([], b"traffic-color", b"canary") == b"traffic-color=canary"
    # a repeated key leaves one member, where the first was
    found = [b"traffic-color=x", b"a=1", b"traffic-color=y"]
    assert baggage.with_color(found, b"traffic-color", b"stable") == b"traffic-color=stable,a=1"


def test_writing_never_breaks_the_limits() -> None:
    full = [b"k%d=v" % i for i in range(64)]
    assert baggage.with_color(full, b"traffic-color", b"canary") is None
    big = [b"a=" + b"x" * 8180]
    assert baggage.with_color(big, b"traffic-color", b"canary") is None
    # replacing a member in place never grows the count
    full[3] = b"traffic-color=stable"
    assert baggage.with_color(full, b"traffic-color", b"canary") is not None


def test_no_header_takes_the_members_color_when_trusted() -> None:
    c = colorer()
    color, reason, event, out = c.with_baggage("stable", MISSING, [b"traffic-color=canary"], True)
    assert (color, reason, event, out) == ("canary", None, baggage.USED, (b"traffic-color=canary",))
    # inbound from a source whose color is not trusted: neither header nor baggage counts
    color, reason, event, out = c.with_baggage(
        "stable", UNTRUSTED, [b"a=1,traffic-color=canary"], False
    )
    assert (color, reason, event) == ("stable", UNTRUSTED, None)
    assert out == (b"a=1,traffic-color=stable",)
    color, _, event, _ = c.with_baggage("stable", MISSING, [b"traffic-color=canary"], False)
    assert color == "stable" and event is None


def test_header_wins_over_a_disagreeing_member_and_is_counted() -> None:
    c = colorer()
    got = c.with_baggage("stable", None, [b"traffic-color=canary"], True)
    assert got == ("stable", None, baggage.DISAGREE, (b"traffic-color=stable",))
    assert c.with_baggage("canary", None, [b"traffic-color=canary"], True)[2] is None


def test_unknown_or_repeated_member_colors_are_not_read() -> None:
    c = colorer()
    got = c.with_baggage("stable", MISSING, [b"traffic-color=purple"], True)
    assert got == ("stable", MISSING, baggage.UNKNOWN, (b"traffic-color=stable",))
    got = c.with_baggage("stable", MISSING, [b"traffic-color=canary,traffic-color=blue"], True)
    assert got[:3] == ("stable", MISSING, baggage.UNKNOWN)
    # a bad header is not rescued by the member: the header's reason stands
    got = c.with_baggage("stable", UNKNOWN, [b"traffic-color=canary"], True)
    assert got[:3] == ("stable", UNKNOWN, None)


def test_malformed_baggage_is_passed_on_untouched_and_never_trusted() -> None:
    values = [b"traffic-color=canary", b"bad member"]
    got = colorer().with_baggage("stable", MISSING, values, True)
    assert got == ("stable", MISSING, baggage.MALFORMED, tuple(values))


def test_over_the_limit_is_passed_on_untouched() -> None:
    values = [b",".join(b"k%d=v" % i for i in range(64))]
    got = colorer(pod="canary").with_baggage("canary", MISSING, values, True)
    assert got == ("canary", MISSING, baggage.OVER_LIMIT, tuple(values))


def test_a_request_without_baggage_gets_the_member_alone() -> None:
    got = colorer().with_baggage("canary", None, (), True)
    assert got == ("canary", None, None, (b"traffic-color=canary",))


def test_decisions_of_repeated_small_values_are_remembered_and_large_values_not_kept() -> None:
    """A peer sending a unique 60 kB baggage value per request (a header may be 64 KiB)
    must not make the sidecar hold them: 300 of them leave less than 1 MiB behind."""
    c = colorer()
    small = [b"traffic-color=canary,userid=42"]
    assert c.with_baggage("stable", MISSING, small, True) is c.with_baggage(
        "stable", MISSING, small, True
    )
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(300):
            value = b"k%06d=" % i + b"v" * 60_000
            assert c.with_baggage("stable", MISSING, [value], True)[2] == baggage.MALFORMED
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2**20, f"{held / 2**20:.1f} MiB held after 300 unique 60 kB values"
