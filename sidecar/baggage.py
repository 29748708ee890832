"""The color in W3C Baggage (``baggage: k=v,...``). Pure functions over header bytes.

OpenTelemetry SDKs carry the ``baggage`` header from a service's inbound request to
its outbound calls on their own (``OTEL_PROPAGATORS`` defaults to
``tracecontext,baggage``), so a color member in it reaches the next hop even
through an app that never copies ``x-traffic-color``. The proxy reads the member
under the header's trust rules and writes it on every request it forwards.

Everything the W3C Baggage specification allows is kept as it came: members other
than the color's stay in order, byte for byte. What it does not allow is never
trusted and never repaired: a malformed header, or one past the limits (8192
bytes, 64 members), is passed on untouched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

MAX_BYTES = 8192  # W3C Baggage: at most 8192 bytes in all baggage headers of a request
MAX_MEMBERS = 64  # and at most 64 list-members

# What happened to a request's baggage; label values of
# traffic_color_baggage_total{direction,event}. Only ever add to this list.
USED = "used"  # no color header: the member's known color was taken
DISAGREE = "disagree"  # header and member name different colors: the header won
MALFORMED = "malformed"  # not W3C Baggage: passed on untouched, never read
UNKNOWN = "unknown"  # the member names no color of the policy (or repeats): not read
OVER_LIMIT = "over_limit"  # adding the member would break the limits: passed on untouched
EVENTS = (USED, DISAGREE, MALFORMED, UNKNOWN, OVER_LIMIT)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"  # baggage-octet
_OWS = rb"[ \t]*"
_MEMBER = rb"%s%s=%s%s(?:%s;%s%s(?:%s=%s%s)?)*" % (
    _TOKEN,
    _OWS,
    _OWS,
    _VALUE,
    _OWS,
    _OWS,
    _TOKEN,
    _OWS,
    _OWS,
    _VALUE,
)
# A whole header value: members separated by commas, empty list elements allowed.
# One match per header line, not one per member: this runs on every request.
_LIST_RE = re.compile(rb"[ \t,]*(?:%s(?:[ \t]*,[ \t,]*%s)*)?[ \t,]*\Z" % (_MEMBER, _MEMBER))


def members(values: Sequence[bytes]) -> list[bytes] | None:
    """The list-members of a request's ``baggage`` headers, as written (outer spaces
    trimmed, empty list elements skipped); None when malformed or past the limits."""
    if sum(len(v) for v in values) > MAX_BYTES:
        return None
    out = []
    for value in values:
        if _LIST_RE.match(value) is None:
            return None
        for part in value.split(b","):
            member = part.strip(b" \t")
            if member:  # else an empty list element (RFC 9110 section 5.6.1)
                out.append(member)
    return out if len(out) <= MAX_MEMBERS else None


def _key_of(member: bytes) -> bytes:
    return member.split(b"=", 1)[0].rstrip(b" \t")


def member_value(found: list[bytes], key: bytes) -> tuple[bytes | None, bool]:
    """``(value, single)``: the decoded value of the ``key`` member, if any, and whether
    no second member of that key names another value."""
    value = None
    for member in found:
        if member.startswith(key) and _key_of(member) == key:
            got = member.split(b"=", 1)[1].split(b";", 1)[0].strip(b" \t")
            if b"%" in got:
                got = unquote_to_bytes(got)
            if value is not None and got != value:
                return value, False
            value = got
    return value, True


def with_color(found: list[bytes] | None, key: bytes, color: bytes) -> bytes | None:
    """The ``baggage`` value to forward: ``found`` with the ``key`` member set to
    ``color`` (in place of the first one, others of that key dropped; else at the
    end). None when the result would break the limits: forward the header untouched.
    """
    mine = b"%s=%s" % (key, color)
    if not found:
        return mine
    out = []
    placed = False
    for member in found:
        if _key_of(member) == key:
            if not placed:
                out.append(mine)
                placed = True
            continue
        out.append(member)
    if not placed:
        out.append(mine)
    value = b",".join(out)
    if len(out) > MAX_MEMBERS or len(value) > MAX_BYTES:
        return None
    return value
