"""Lanes at run time: the pure decision of ``lanes.py`` plus the lookups, the lane connect
timeout and the fallback counts. One per policy; the resolver cache outlives reloads.

The HTTP/1 and HTTP/2 paths call ``choose``, then ``open`` for a lane choice, then
``fall_back`` when ``open`` raised ``EmptyLane`` (see ``lanes.py`` for the sequence).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from sidecar.proxy.lanes import REFUSED, TIMEOUT, Choice, EmptyLane, LaneTable
from sidecar.proxy.resolver import ResolverCache

if TYPE_CHECKING:
    from sidecar.admin.metrics import ProxyMetrics
    from sidecar.policy import Policy

T = TypeVar("T")

# connect(address, timeout) -> a connection to that address at the choice's port;
# raises TimeoutError or OSError
Connect = Callable[[str, float], Awaitable[T]]


class LaneRouter:
    """What the proxy asks about lanes; ``None`` in the context when no route is defined."""

    def __init__(self, policy: Policy, cache: ResolverCache, metrics: ProxyMetrics) -> None:
        self.table = LaneTable(policy.routes, policy.default_color, policy.cluster_domain)
        self.cache = cache
        self.metrics = metrics
        self.timeout = policy.timeouts.lane_connect
        self.choose = self.table.choose  # the hot path calls the table's method directly

    async def open(self, choice: Choice, connect: Connect[T]) -> T:
        """A connection to ``choice``'s lane; raises ``EmptyLane`` when it has nobody.

        A name may have several addresses (a headless Service's pods, a hosts file,
        IPv4 and IPv6): they are tried in order, one at a time, and
        ``timeouts.lane_connect`` bounds the whole attempt, because it is how long a
        request waits before it falls back, whatever the number of addresses. Each
        attempt gets an equal share of the time left (two addresses: 250 ms each of
        the default 500 ms, Happy Eyeballs' attempt delay), so an address that never
        answers cannot use up the time of a live one after it; one that refuses hands
        its share on at once. An address that failed is tried after the others for a
        TTL. The lane is empty only when every address failed: ``timeout`` when one
        of them did not answer, else ``refused``. A lookup not answered from the cache
        has a ``lane_connect`` of its own before that (the addresses' time is counted
        from its answer, so a slow answer does not leave them too little to connect).
        """
        host, port = choice.host, choice.port
        down = self.cache.known_down(host, port)
        if down is not None:
            raise EmptyLane(host, down)
        # A lookup that does not answer within lane_connect makes the lane empty for this
        # request as a silent host does (``timeout``, not ``unresolved``: the name may well
        # exist); the lookup is shared and shielded, so it goes on and its answer is cached.
        try:
            async with asyncio.timeout(self.timeout):
                addresses = await self.cache.resolve(host)
        except TimeoutError:
            raise EmptyLane(host, TIMEOUT) from None
        several = len(addresses) > 1
        if several:
            known_down = self.cache.known_down
            addresses = sorted(addresses, key=lambda a: known_down(a, port) is not None)
        clock = asyncio.get_running_loop().time
        deadline = clock() + self.timeout
        reason = REFUSED
        for i, address in enumerate(addresses):
            left = deadline - clock()
            if left <= 0:
                reason = TIMEOUT
                break
            try:
                return await connect(address, left / (len(addresses) - i))
            except TimeoutError:
                failed = reason = TIMEOUT
            except OSError:  # refused, reset at once, unreachable: an answer that says no
                failed = REFUSED
            if several:
                self.cache.mark_down(address, port, failed)
        self.cache.mark_down(host, port, reason)
        raise EmptyLane(host, reason)

    def fall_back(self, choice: Choice, reason: str) -> Choice | None:
        """Count an empty lane; the original destination, or None to answer 503."""
        assert choice.route is not None
        self.metrics.lane_fallback(choice.route.host, choice.color, reason)
        if choice.fallback_fails:
            return None
        return self.table.fallback(choice, reason)

    def describe(
        self, color: str, host: str, port: int, original: tuple[str, int] | None = None
    ) -> dict:
        """``/debug/route?color=&host=[&dst=]``: where a carried ``color`` to ``host`` goes
        now; ``original`` as in ``LaneTable.choose`` (the captured destination)."""
        choice = self.table.choose(color, host, port, True, original)
        out = choice.describe()
        if choice.route is not None and choice.why == "lane":
            out["lane"] = self.cache.state(choice.host, choice.port)
            reason = out["lane"].get("reason")
            if reason is not None:
                fallback = self.table.fallback(choice, reason)
                out = {**out, **fallback.describe(), "lane": out["lane"]}
                if choice.fallback_fails:
                    out["destination"] = None
                    out["answer"] = 503
        return out

    def status(self) -> list[dict]:
        """The routes with their lanes' state, for ``/status``."""
        out = []
        for route in self.table.routes:
            lanes = {}
            for color, lane in route.lanes.items():
                lanes[color] = {
                    "host": lane.host,
                    "port": lane.port or None,
                    **self.cache.state(lane.host, lane.port),
                }
                qualified = [n for n in self.cache.names_of(lane.host) if n != lane.host]
                if qualified:
                    lanes[color]["names"] = {n: self.cache.state(n, lane.port) for n in qualified}
            out.append(
                {"host": route.host, "fallback": route.fallback, "line": route.line, "lanes": lanes}
            )
        return out
