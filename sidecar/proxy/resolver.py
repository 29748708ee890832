"""Lane names -> addresses, cached with positive and negative entries, each with a TTL.

An empty lane is the common case of a gray release (most services have no canary
yet), so what it costs matters: one lookup per TTL, not one per request. Answers
come from c-ares through ``aiodns`` (``/etc/hosts`` first, then the resolvers of
``/etc/resolv.conf``, without a thread per lookup), which gives each record's TTL.
Where there is none (a hosts-file entry, a failed lookup: c-ares does not hand out
the SOA minimum of a negative answer) the entry lives ``DEFAULT_TTL`` seconds,
CoreDNS's TTL for cluster records and its negative cache floor. A lane found empty
by connecting (refused, timed out) is cached the same way, so a dead lane host is
not tried by every request either. Lookups of one name at the same time share one
query, shielded: a request that stops waiting for it (``LaneRouter.open`` waits at most
``timeouts.lane_connect``, then counts the lane empty with ``timeout``) leaves it
running, and its answer is cached for the requests after.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sidecar.proxy.lanes import NO_ADDRESS, UNRESOLVED, EmptyLane, is_ip

log = logging.getLogger(__name__)

DEFAULT_TTL = 5.0  # seconds, for answers that carry no TTL (see the module docstring)
MAX_TTL = 300.0  # a long DNS TTL still lets a lane that emptied be noticed within minutes
MIN_TTL = 1.0
MAX_ENTRIES = 4096  # names (and lanes found down) remembered before starting over
OK = "ok"  # label value of traffic_color_lane_lookups_total{result} besides EMPTY reasons

# host -> (addresses, ttl or None); raises EmptyLane(UNRESOLVED | NO_ADDRESS)
Lookup = Callable[[str], Awaitable[tuple[tuple[str, ...], float | None]]]


@dataclass(slots=True)
class Entry:
    """A cached answer: addresses, or the reason the name has none, until ``expires``."""

    addresses: tuple[str, ...]
    reason: str | None  # None: usable; else an EMPTY reason
    expires: float


class ResolverCache:
    """Lane host names -> addresses; one per sidecar, kept across policy reloads."""

    def __init__(
        self,
        lookup: Lookup | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_lookup: Callable[[str], None] | None = None,
    ) -> None:
        self._lookup = lookup or _aiodns_lookup()
        self._clock = clock
        self._on_lookup = on_lookup  # told each lookup's result (metrics)
        self._entries: dict[str, Entry] = {}
        # (host, port) -> (reason, until): lanes found empty by connecting
        self._down: dict[tuple[str, int], tuple[str, float]] = {}
        self._pending: dict[str, asyncio.Future[Entry]] = {}

    async def resolve(self, host: str) -> tuple[str, ...]:
        """The addresses of ``host``; raises ``EmptyLane`` while it has none."""
        if is_ip(host):
            return (host,)
        entry = self._entries.get(host)
        if entry is None or entry.expires <= self._clock():
            pending = self._pending.get(host)
            if pending is None:
                pending = self._pending[host] = asyncio.ensure_future(self._refresh(host))
                pending.add_done_callback(lambda _: self._pending.pop(host, None))
            entry = await asyncio.shield(pending)
        if entry.reason is not None:
            raise EmptyLane(host, entry.reason)
        return entry.addresses

    async def _refresh(self, host: str) -> Entry:
        try:
            addresses, ttl = await self._lookup(host)
            reason = None if addresses else NO_ADDRESS
        except EmptyLane as exc:
            addresses, ttl, reason = (), None, exc.reason
        except Exception as exc:  # a resolver failure: the lane cannot be found
            log.info("lookup of lane host %s failed: %s", host, exc)
            addresses, ttl, reason = (), None, UNRESOLVED
        if self._on_lookup is not None:
            self._on_lookup(reason or OK)
        life = DEFAULT_TTL if not ttl else min(MAX_TTL, max(MIN_TTL, ttl))
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()  # lane names qualified by what apps sent: bounded
        entry = self._entries[host] = Entry(addresses, reason, self._clock() + life)
        return entry

    def mark_down(self, host: str, port: int, reason: str) -> None:
        """Connecting found the lane empty: say so for a TTL without trying it again."""
        if len(self._down) >= MAX_ENTRIES:
            self._down.clear()
        self._down[(host, port)] = (reason, self._clock() + DEFAULT_TTL)

    def known_down(self, host: str, port: int) -> str | None:
        """Why ``host:port`` refused or timed out, while that is still news (no lookup)."""
        found = self._down.get((host, port))
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._down[(host, port)]
            return None
        return found[0]

    def known_empty(self, host: str, port: int) -> str | None:
        """Why ``host:port`` has nobody, while a cached answer says so (no lookup, no
        connection): found down by connecting, or a negative lookup still in its TTL."""
        down = self.known_down(host, port)
        if down is not None:
            return down
        entry = self._entries.get(host)
        if entry is not None and entry.reason is not None and entry.expires > self._clock():
            return entry.reason
        return None

    def names_of(self, lane_host: str) -> list[str]:
        """Names the cache holds for a lane: ``lane_host`` itself and the namespace-qualified
        forms requests made of it (``reviews-canary.shop.svc``), for ``/status``."""
        prefix = lane_host + "."
        known = {h for h, _ in list(self._down)} | set(list(self._entries))
        return sorted(h for h in known if h == lane_host or h.startswith(prefix))

    def state(self, host: str, port: int = 0) -> dict:
        """What the cache knows of ``host`` (at ``port``; 0: any) now, for ``/status``."""
        now = self._clock()
        for (h, p), (reason, until) in list(self._down.items()):
            if h == host and (p == port or not port) and until > now:
                return {"state": "empty", "reason": reason, "ttl_left": round(until - now, 1)}
        if is_ip(host):
            return {"state": "ready", "addresses": [host]}
        entry = self._entries.get(host)
        if entry is None:
            return {"state": "unknown"}
        left = round(entry.expires - self._clock(), 1)
        if left <= 0:
            return {"state": "expired"}
        if entry.reason is not None:
            return {"state": "empty", "reason": entry.reason, "ttl_left": left}
        return {"state": "ready", "addresses": list(entry.addresses), "ttl_left": left}


def _aiodns_lookup() -> Lookup:
    """A lookup through c-ares; the resolver is made on first use, in the running loop."""
    import aiodns
    from aiodns import error as ares

    resolver: list[aiodns.DNSResolver] = []

    async def lookup(host: str) -> tuple[tuple[str, ...], float | None]:
        if not resolver:
            resolver.append(aiodns.DNSResolver(loop=asyncio.get_running_loop()))
        try:
            result = await resolver[0].getaddrinfo(
                host, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
            )
        except ares.DNSError as exc:
            code = exc.args[0] if exc.args else None
            raise EmptyLane(host, NO_ADDRESS if code == ares.ARES_ENODATA else UNRESOLVED) from None
        addresses: list[str] = []
        ttls = []
        # IPv4 first: a dual-stack name is reached the way most clusters route.
        for node in sorted(result.nodes, key=lambda n: n.family != socket.AF_INET):
            addr = node.addr[0]
            addr = addr.decode() if isinstance(addr, bytes) else addr
            if addr not in addresses:
                addresses.append(addr)
            if node.ttl > 0:
                ttls.append(node.ttl)
        return tuple(addresses), (min(ttls) if ttls else None)

    return lookup
