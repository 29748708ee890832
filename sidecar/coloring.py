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
                    return color
        return None


def _ranges(split: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    """Cumulative bucket bounds in file order.

    Each color owns [start, start + percent) of the buckets, where start only
    depends on the colors before it: raising a color's percent grows its range at
    the end, so keys only ever move into it.
    """
    out = []
    upper = 0
    for color, pct in split:
        upper += pct * (SPLIT_BUCKETS // 100)
        out.append((color, upper))
    return tuple(out)
