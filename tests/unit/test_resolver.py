"""The lane resolver cache: positive and negative entries, TTLs, one lookup at a time."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.proxy.lanes import NO_ADDRESS, REFUSED, UNRESOLVED, EmptyLane
from sidecar.proxy.resolver import DEFAULT_TTL, MIN_TTL, ResolverCache


class FakeDNS:
    """Answers from a table, counting every lookup; the clock is moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.table: dict[str, tuple[tuple[str, ...], float | None] | str] = {}
        self.lookups: list[str] = []
        self.results: list[str] = []
        self.gate: asyncio.Event | None = None

    async def lookup(self, host: str) -> tuple[tuple[str, ...], float | None]:
        self.lookups.append(host)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.table.get(host, UNRESOLVED)
        if isinstance(answer, str):
            raise EmptyLane(host, answer)
        return answer

    def cache(self) -> ResolverCache:
        return ResolverCache(self.lookup, clock=lambda: self.now, on_lookup=self.results.append)


async def test_an_empty_lane_costs_one_lookup_per_ttl() -> None:
    dns = FakeDNS()
    cache = dns.cache()
    for _ in range(100):
        with pytest.raises(EmptyLane) as info:
            await cache.resolve("reviews-canary")
        assert info.value.reason == UNRESOLVED
    assert dns.lookups == ["reviews-canary"]
    dns.now += DEFAULT_TTL - 0.01
    with pytest.raises(EmptyLane):
        await cache.resolve("reviews-canary")
    assert len(dns.lookups) == 1
    dns.now += 0.02
    dns.table["reviews-canary"] = (("10.0.0.7",), None)  # the canary came up
    assert await cache.resolve("reviews-canary") == ("10.0.0.7",)
    assert dns.lookups == ["reviews-canary"] * 2 and dns.results == [UNRESOLVED, "ok"]


async def test_positive_answers_live_their_ttl_within_bounds() -> None:
    dns = FakeDNS()
    dns.table["a"] = (("10.0.0.1",), 30.0)
    dns.table["b"] = (("10.0.0.2",), 0.1)  # below the floor
    cache = dns.cache()
    await cache.resolve("a")
    await cache.resolve("b")
    dns.now += 29
    await cache.resolve("a")
    assert dns.lookups == ["a", "b"]
    assert cache.state("a")["state"] == "ready"
    dns.now += 1.5
    await cache.resolve("a")
    assert dns.lookups == ["a", "b", "a"]
    assert MIN_TTL == 1.0 and cache.state("b") == {"state": "expired"}


async def test_no_address_is_its_own_reason() -> None:
    dns = FakeDNS()
    dns.table["empty"] = NO_ADDRESS
    dns.table["nothing"] = ((), 10.0)
    cache = dns.cache()
    for host in ("empty", "nothing"):
        with pytest.raises(EmptyLane) as info:
            await cache.resolve(host)
        assert info.value.reason == NO_ADDRESS


async def test_lookups_at_the_same_time_share_one_query() -> None:
    dns = FakeDNS()
    dns.gate = asyncio.Event()
    dns.table["r"] = (("10.0.0.1",), None)
    cache = dns.cache()
    tasks = [asyncio.ensure_future(cache.resolve("r")) for _ in range(50)]
    await asyncio.sleep(0)
    dns.gate.set()
    assert set(await asyncio.gather(*tasks)) == {("10.0.0.1",)}
    assert dns.lookups == ["r"]


async def test_a_lane_found_empty_by_connecting_is_remembered_per_port() -> None:
    dns = FakeDNS()
    cache = dns.cache()
    cache.mark_down("r", 9080, REFUSED)
    assert cache.known_down("r", 9080) == REFUSED
    assert cache.known_down("r", 9081) is None  # another port of the same host
    assert cache.state("r", 9080)["state"] == "empty"
    assert cache.state("r")["reason"] == REFUSED  # any port
    dns.now += DEFAULT_TTL + 0.1
    assert cache.known_down("r", 9080) is None
    assert dns.lookups == []


async def test_a_failing_resolver_is_an_unresolved_lane() -> None:
    async def broken(host: str) -> tuple[tuple[str, ...], float | None]:
        raise OSError("resolver socket gone")

    cache = ResolverCache(broken)
    with pytest.raises(EmptyLane) as info:
        await cache.resolve("x")
    assert info.value.reason == UNRESOLVED


async def test_the_real_resolver_reads_etc_hosts() -> None:
    # (Negative answers from a real DNS server: tests/netns/test_lanes.py, in a namespace.)
    assert "127.0.0.1" in await ResolverCache().resolve("localhost")


async def test_the_names_a_lane_was_looked_up_under() -> None:
    dns = FakeDNS()
    dns.table["r-canary.shop"] = (("10.0.0.3",), None)
    cache = dns.cache()
    await cache.resolve("r-canary.shop")
    cache.mark_down("r-canary", 80, REFUSED)
    with pytest.raises(EmptyLane):
        await cache.resolve("r-canary-2")
    assert cache.names_of("r-canary") == ["r-canary", "r-canary.shop"]
