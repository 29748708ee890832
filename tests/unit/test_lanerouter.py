"""``LaneRouter.open``: a lane name's addresses tried in order within one lane_connect budget.

The connect here is a stand-in that behaves as ``Pool.connect`` does per address
(refuses at once, or never answers and times out at the timeout it was given);
real sockets and names are in tests/netns/test_lanes.py.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.admin.metrics import ProxyMetrics
from sidecar.policy import parse_policy
from sidecar.proxy.lanerouter import LaneRouter
from sidecar.proxy.lanes import LANE, REFUSED, TIMEOUT, EmptyLane
from sidecar.proxy.resolver import ResolverCache

POLICY = parse_policy(
    "colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\n"
    "outbound:\n  routes:\n    - host: reviews\n      lanes: {canary: reviews-canary}\n"
    "timeouts: {lane_connect: 0.4}\n"
)
V4_DEAD, V4_HOLE, V4_LIVE, V6_LIVE = "10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::3"


class FakeNet:
    """Addresses that refuse, never answer, or accept; records (address, timeout) tried."""

    def __init__(self, refuse: set[str] = frozenset(), hang: set[str] = frozenset()) -> None:
        self.refuse, self.hang = refuse, hang
        self.tried: list[tuple[str, float]] = []

    async def connect(self, address: str, timeout: float) -> str:
        self.tried.append((address, timeout))
        async with asyncio.timeout(timeout):
            if address in self.refuse:
                raise ConnectionRefusedError(address)
            if address in self.hang:
                await asyncio.sleep(60)
        return f"conn to {address}"


def router(*addresses: str) -> LaneRouter:
    async def lookup(host: str) -> tuple[tuple[str, ...], float | None]:
        return addresses, 30.0

    return LaneRouter(POLICY, ResolverCache(lookup), ProxyMetrics())


def lane(r: LaneRouter):
    choice = r.choose("canary", "reviews", 9080)
    assert choice.why == LANE
    return choice


async def test_a_refusing_address_hands_on_to_the_next_at_once() -> None:
    r, net = router(V4_DEAD, V4_LIVE), FakeNet(refuse={V4_DEAD})
    assert await r.open(lane(r), net.connect) == f"conn to {V4_LIVE}"
    assert [a for a, _ in net.tried] == [V4_DEAD, V4_LIVE]
    assert r.cache.known_down("reviews-canary", 9080) is None  # the lane is not empty


async def test_one_budget_for_the_whole_attempt_shared_among_the_addresses() -> None:
    r, net = router(V4_HOLE, V4_LIVE, V6_LIVE), FakeNet(hang={V4_HOLE})
    t0 = asyncio.get_running_loop().time()
    assert await r.open(lane(r), net.connect) == f"conn to {V4_LIVE}"
    took = asyncio.get_running_loop().time() - t0
    (first, t1), (second, t2) = net.tried
    assert (first, second) == (V4_HOLE, V4_LIVE)
    assert t1 == pytest.approx(0.4 / 3, abs=0.01)  # a third each of lane_connect ...
    assert t2 == pytest.approx((0.4 - t1) / 2, abs=0.02)  # ... then half of what is left
    assert took < 0.3


async def test_every_address_failing_empties_the_lane_timeout_if_one_never_answered() -> None:
    r, net = router(V4_HOLE, V4_DEAD), FakeNet(refuse={V4_DEAD}, hang={V4_HOLE})
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(EmptyLane) as info:
        await r.open(lane(r), net.connect)
    assert info.value.reason == TIMEOUT
    assert asyncio.get_running_loop().time() - t0 < 0.4 + 0.1  # never past lane_connect
    assert r.cache.known_down("reviews-canary", 9080) == TIMEOUT
    r2, net2 = router(V4_DEAD, V6_LIVE), FakeNet(refuse={V4_DEAD, V6_LIVE})
    with pytest.raises(EmptyLane) as info:
        await r2.open(lane(r2), net2.connect)
    assert info.value.reason == REFUSED
    assert [a for a, _ in net2.tried] == [V4_DEAD, V6_LIVE]


async def test_an_address_that_failed_is_tried_after_the_others_for_a_ttl() -> None:
    r, net = router(V4_HOLE, V4_LIVE), FakeNet(hang={V4_HOLE})
    await r.open(lane(r), net.connect)
    net.tried.clear()
    assert await r.open(lane(r), net.connect) == f"conn to {V4_LIVE}"
    assert [a for a, _ in net.tried] == [V4_LIVE]  # no second wait on the dead one


async def test_a_single_address_gets_the_whole_budget() -> None:
    r, net = router(V4_LIVE), FakeNet()
    await r.open(lane(r), net.connect)
    assert net.tried == [(V4_LIVE, pytest.approx(0.4, abs=0.01))]
