"""Which color a request gets. Pure decisions over header bytes; no sockets.

A ``Colorer`` is built once per policy (and rebuilt on reload), so the hot path
only does dictionary lookups on bytes it already has. The proxy hands it the
values of the color header and, inbound, the few headers the rules read
(``inbound_capture``); it answers the color and, when the request's own header
was not kept as is, the reason, which the proxy counts.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence

from sidecar import baggage
from sidecar.policy import COLOR_NAME_RE, Policy, Rule

# Why the color header was (re)written; label values of
# traffic_color_header_rewrites_total{reason}. Only ever add to this list.
MISSING = "missing"  # no color header: one was set
UNKNOWN = "unknown"  # well-formed name that the policy does not define
MALFORMED = "malformed"  # not a color token at all
REPEATED = "repeated"  # several header lines, or a comma list
UNTRUSTED = "untrusted"  # inbound from a source whose color we do not trust
REASONS = (MISSING, UNKNOWN, MALFORMED, REPEATED, UNTRUSTED)

SPLIT_BUCKETS = 10_000  # percent * 100: fine-grained, and a percent maps to whole buckets

Captured = dict[bytes, list[bytes]]


# Baggage values up to this many bytes have their decision remembered: 4096 of them
# hold at most ~4 MiB, where values up to the 64 KiB header limit would hold 256 MiB.
_BAG_CACHED = 1024


def split_bucket(key: bytes) -> int:
    """Stable bucket of a sticky key: the same key lands in the same bucket forever."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % SPLIT_BUCKETS


def parse_cookies(values: Sequence[bytes]) -> dict[bytes, bytes]:
    """``Cookie`` header values -> name -> value (the first occurrence wins, as browsers send)."""
    jar: dict[bytes, bytes] = {}
    for value in values:
        for part in value.split(b";"):
            name, eq, val = part.strip().partition(b"=")
            if eq and name and name not in jar:
                jar[name] = val.strip().strip(b'"')
    return jar


class Colorer:
    """The coloring decisions of one policy and one pod color."""

    def __init__(self, policy: Policy, pod_color: str) -> None:
        if pod_color not in policy.colors:
            raise ValueError(f"pod color {pod_color!r} is not defined by the policy")
        self.policy = policy
        self.pod_color = pod_color
        self.header = policy.header.encode("ascii")
        self._known = {name.encode("ascii"): name for name in policy.colors}
        inbound = policy.inbound
        self.trust_header = inbound.trust_header
        self._trusted_sources = inbound.trusted_sources
        self._rules: tuple[Rule, ...] = inbound.rules
        self._splits = {id(rule): _ranges(rule.split) for rule in self._rules if rule.split}
        capture: set[bytes] = set()
        for rule in self._rules:
            if rule.match and rule.match.header:
                capture.add(rule.match.header[0].encode("ascii"))
            if (rule.match and rule.match.cookie) or (
                rule.sticky_key and rule.sticky_key.source == "cookie"
            ):
                capture.add(b"cookie")
            if rule.sticky_key and rule.sticky_key.source == "header":
                capture.add(rule.sticky_key.name.encode("ascii"))
        # Lower-case names of the headers the inbound rules read; the proxy keeps
        # their values aside while parsing and ignores every other header.
        self.inbound_capture: frozenset[bytes] = frozenset(capture)
        # The W3C Baggage member that carries the color, or None: baggage is off.
        key = policy.baggage_key
        self.baggage_key: bytes | None = key.encode("ascii") if key is not None else None
        # color -> what a request without baggage gets: the color member alone
        self._bag_alone = {
            name: (b"%s=%s" % (self.baggage_key, name.encode("ascii")),)
            for name in policy.colors
            if self.baggage_key is not None
        }
        # Apps repeat the same few baggage values: decisions remembered per value.
        self._bag_cache: dict[tuple, tuple[str, str | None, str | None, tuple[bytes, ...]]] = {}

    # ------------------------------------------------------------ shared

    def classify(self, values: Sequence[bytes]) -> tuple[str | None, str | None]:
        """A request's own color header -> (known color, None) or (None, why it is not)."""
        if not values:
            return None, MISSING
        if len(values) > 1:
            return None, REPEATED
        value = values[0].strip(b" \t")
        name = self._known.get(value)
        if name is not None:
            return name, None
        if b"," in value:
            return None, REPEATED
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None, MALFORMED
        return None, (UNKNOWN if COLOR_NAME_RE.match(text) else MALFORMED)

    def with_baggage(
        self, color: str, reason: str | None, values: Sequence[bytes], trusted: bool
    ) -> tuple[str, str | None, str | None, tuple[bytes, ...]]:
        """Apply a request's ``baggage`` headers to the color its header (or the rules)
        gave: ``(color, reason, baggage event or None, baggage values to forward)``.

        A request without a color header takes a known color from the member when it
        is ``trusted`` (the header's trust rules; outbound always); with a header, the
        header wins and a disagreeing member is counted. The forwarded value carries
        the final color; malformed baggage, or baggage the member would push past the
        W3C limits, goes on untouched.
        """
        if not values:
            return color, reason, None, self._bag_alone[color]
        cache_key = (color, reason, trusted, *values)
        try:
            return self._bag_cache[cache_key]
        except KeyError:
            pass
        decided = self._with_baggage(color, reason, values, trusted)
        if sum(map(len, values)) > _BAG_CACHED:
            return decided  # a large value is rarely repeated; kept, it costs its size
        if len(self._bag_cache) >= 4096:
            self._bag_cache.clear()
        self._bag_cache[cache_key] = decided
        return decided

    def _with_baggage(
        self, color: str, reason: str | None, values: Sequence[bytes], trusted: bool
    ) -> tuple[str, str | None, str | None, tuple[bytes, ...]]:
        key: bytes = self.baggage_key  # type: ignore[assignment]
        found = baggage.members(values)
        if found is None:
            return color, reason, baggage.MALFORMED, tuple(values)
        event = None
        value, single = baggage.member_value(found, key)
        if value is not None:
            known = self._known.get(value) if single else None
            if known is None:
                event = baggage.UNKNOWN
            elif reason == MISSING and trusted:
                color, reason, event = known, None, baggage.USED
            elif reason is None and known != color:
                event = baggage.DISAGREE
        out = baggage.with_color(found, key, color.encode("ascii"))
        if out is None:
            return color, reason, baggage.OVER_LIMIT, tuple(values)
        return color, reason, event, (out,)

    # ------------------------------------------------------------ outbound

    def outbound(self, values: Sequence[bytes]) -> tuple[str, str | None]:
        """App -> world: keep a single known color the app propagated, else the pod's."""
        color, reason = self.classify(values)
        if color is not None:
            return color, None
        return self.pod_color, reason

    # ------------------------------------------------------------ inbound

    def peer_trusted(self, peer_ip: str | None) -> bool:
        """Whether a connection's color header counts; decided once per connection."""
        if self.trust_header:
            return True
        if not peer_ip or not self._trusted_sources:
            return False
        try:
            addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._trusted_sources)

    def inbound(
        self, values: Sequence[bytes], captured: Captured, trusted: bool
    ) -> tuple[str, str | None]:
        """World -> app: a trusted known color, else the first rule that decides, else the pod's.

        The reason is None only when the request's own header was kept.
        """
        if values:
            if trusted:
                color, reason = self.classify(values)
                if color is not None:
                    return color, None
            else:
                reason = UNTRUSTED
        else:
            reason = MISSING
        return self.by_rules(captured) or self.pod_color, reason

    def by_rules(self, captured: Captured) -> str | None:
        """First rule that decides; a split with no key, or outside every share, falls through."""
        jar: dict[bytes, bytes] | None = None
        for rule in self._rules:
            if rule.match is not None:
                header = rule.match.header
                if header is not None:
                    wanted = header[1].encode()
                    got = captured.get(header[0].encode("ascii"), ())
                    if not any(v.strip(b" \t") == wanted for v in got):
                        continue
                cookie = rule.match.cookie
                if cookie is not None:
                    if jar is None:
                        jar = parse_cookies(captured.get(b"cookie", ()))
                    if jar.get(cookie[0].encode()) != cookie[1].encode():
                        continue
                return rule.color
            key = rule.sticky_key
            assert key is not None
            if key.source == "header":
                got = captured.get(key.name.encode("ascii"))
                sticky = got[0].strip(b" \t") if got else b""
            else:
                if jar is None:
                    jar = parse_cookies(captured.get(b"cookie", ()))
                sticky = jar.get(key.name.encode(), b"")
            if not sticky:
                continue
            bucket = split_bucket(sticky)
            for color, upper in self._splits[id(rule)]:
                if bucket < upper:
                    if color:
                        return color
                    break  # the unowned middle
        return None


def _ranges(split: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    """Bucket bounds ``(color, upper)`` in ascending order, colors taking turns at both ends.

    The colors listed 1st, 3rd, 5th, ... own consecutive ranges growing up from
    bucket 0, the 2nd, 4th, ... consecutive ranges growing down from the top, and
    buckets no color owns (percents adding up to less than 100: the pod's color)
    sit in the middle. A color's range depends only on its own percent and those
    listed before it at its end, so:

    - raising a color's percent only moves keys into it, and lowering one only moves
      keys out of it, into the unowned middle or the next color at its end;
    - a color keeps every key while its percent and those listed before it at its
      end stay the same: moving share between the 1st and 3rd color keeps the 2nd
      ({a: 10, b: 20, c: 70} -> {a: 20, b: 20, c: 60} moves keys from c to a only),
      and a 2nd color raised into the unowned middle keeps the 1st and 3rd.

    No layout that is a function of the split alone can keep every unchanged color's
    keys in every change with three or more colors: {a: 40, b: 40} -> {a: 40, c: 40}
    keeps a, {a: 40, c: 40} -> {b: 40, c: 40} keeps c and {b: 40, c: 40} -> {a: 40,
    b: 40} keeps b only if three disjoint 40% shares fit into 100%.
    """
    step = SPLIT_BUCKETS // 100
    low: list[tuple[str, int]] = []  # (color, upper bound), growing up from 0
    high: list[tuple[str, int]] = []  # (color, lower bound), growing down from the top
    bottom, top = 0, SPLIT_BUCKETS
    for i, (color, pct) in enumerate(split):
        if i % 2 == 0:
            bottom += pct * step
            low.append((color, bottom))
        else:
            top -= pct * step
            high.append((color, top))
    out = list(low)
    if top > bottom:
        out.append(("", top))  # the unowned middle: falls through to the next rule
    # A high color owns [its lower bound, the lower bound of the one before it).
    uppers = [SPLIT_BUCKETS, *(lower for _, lower in high)][: len(high)]
    for (color, _), upper in reversed(list(zip(high, uppers, strict=True))):
        out.append((color, upper))
    return tuple(out)
