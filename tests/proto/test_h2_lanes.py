"""HTTP/2 lanes in-process: streams that wait on a lane connection still being made.

The lane's lookup is a ``Gate`` the test opens when it likes, so streams pile up on a
connection that is not made yet; the lane is then found empty (the name does not
resolve, the port refuses, nothing answers) or not. Each test is what a user checks
of those streams: each answered once, from the lane or from its fallback, counted
once. Real names and DNS are in tests/netns/test_lanes_h2.py.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from sidecar.policy import parse_policy
from sidecar.proxy import Proxy
from sidecar.proxy.http2 import pool as h2pool
from sidecar.proxy.lanerouter import LaneRouter
from sidecar.proxy.lanes import UNRESOLVED, EmptyLane
from sidecar.proxy.resolver import ResolverCache
from tests.proto.conftest import MakeProxy, port, sample, stuck_listener, until
from tests.proto.h2help import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    RST_STREAM,
    GrpcBackend,
    RawH2,
    RawUpstream,
    call,
    channel,
    frame,
    free_port,
    hpack,
    in_thread,
    request_fields,
)

CANARY = [("x-traffic-color", "canary")]


def policy(lane: str, fallback: str = "stable", lane_connect: float = 0.3) -> str:
    """``localhost`` has a canary lane at ``lane``."""
    return (
        "colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\n"
        "outbound:\n  routes:\n    - host: localhost\n"
        f"      lanes: {{canary: '{lane}'}}\n"
        f"      fallback: {fallback}\n"
        f"timeouts:\n  lane_connect: {lane_connect}\n"
    )


class Gate:
    """A lane lookup that waits until ``open(address)``; ``None``: the name does not resolve."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.address: str | None = None
        self.calls = 0

    async def lookup(self, host: str) -> tuple[tuple[str, ...], float | None]:
        self.calls += 1
        await self.event.wait()
        if self.address is None:
            raise EmptyLane(host, UNRESOLVED)
        return (self.address,), 60.0

    def open(self, address: str | None) -> None:
        self.address = address
        self.event.set()


async def nxdomain(host: str) -> tuple[tuple[str, ...], float | None]:
    raise EmptyLane(host, UNRESOLVED)


async def lane_proxy(make_proxy: MakeProxy, text: str, lookup=None) -> Proxy:
    proxy = await make_proxy(policy=text)
    cache = ResolverCache(lookup or Gate().lookup)
    proxy.ctx.lanes = LaneRouter(parse_policy(text), cache, proxy.ctx.metrics)
    return proxy


def answered(*sids: int):
    """``frames_until``'s test: each of ``sids`` has its answer head."""
    return lambda frames: all(heads(frames, sid) for sid in sids)


def heads(frames: list, sid: int) -> int:
    return sum(1 for k, _, s, _ in frames if k == HEADERS and s == sid)


def fallbacks(proxy: Proxy, reason: str) -> float:
    labels = {"host": "localhost", "color": "canary", "reason": reason}
    return sample(proxy, "traffic_color_lane_fallbacks_total", **labels)


def answers(proxy: Proxy, code: str) -> float:
    labels = {"direction": "outbound", "color": "canary", "code": code}
    return sample(proxy, "traffic_color_requests_total", **labels)


async def streams(proxy: Proxy, authority: str, sids: list[int]) -> RawH2:
    """A client connection with a canary GET to ``authority`` on each of ``sids``."""
    conn = await RawH2.open(port(proxy))
    block = hpack(request_fields(authority, "/", CANARY))
    await conn.send(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, s, block) for s in sids))
    return conn


# ------------------------------------------------------ streams piled up on one lane connect


async def test_streams_waiting_on_a_refusing_lane_each_fall_back_and_are_counted_once(
    make_proxy: MakeProxy,
) -> None:
    up = await RawUpstream().start()
    gate = Gate()
    proxy = await lane_proxy(make_proxy, policy(f"lane-host:{free_port()}"), gate.lookup)
    sids = list(range(1, 80, 2))  # 40 streams
    conn = await streams(proxy, f"localhost:{up.port}", sids)
    assert await until(lambda: gate.calls == 1)  # all of them wait on one lookup
    gate.open("127.0.0.1")  # it resolves; nothing listens at the port
    await conn.frames_until(answered(*sids))
    conn.close()
    assert len(up.requests) == len(sids) and all(heads(conn.frames, s) == 1 for s in sids)
    assert fallbacks(proxy, "refused") == len(sids) == answers(proxy, "200")
    await up.close()


async def test_a_stream_reset_while_waiting_is_neither_sent_nor_counted_as_a_fallback(
    make_proxy: MakeProxy,
) -> None:
    up = await RawUpstream().start()
    gate = Gate()
    proxy = await lane_proxy(make_proxy, policy("lane-host"), gate.lookup)
    conn = await streams(proxy, f"localhost:{up.port}", [1, 3, 5])
    assert await until(lambda: gate.calls == 1)
    await conn.send(frame(RST_STREAM, 0, 3, struct.pack(">I", 0x8)))  # CANCEL
    assert await until(lambda: answers(proxy, "499") == 1)
    gate.open(None)
    await conn.frames_until(answered(1, 5))
    conn.close()
    assert len(up.requests) == 2 and heads(conn.frames, 3) == 0  # (upstream stream ids)
    assert fallbacks(proxy, "unresolved") == 2
    await up.close()


async def test_a_request_body_sent_while_waiting_reaches_the_fallback_whole(
    make_proxy: MakeProxy,
) -> None:
    be = GrpcBackend()
    gate = Gate()
    proxy = await lane_proxy(make_proxy, policy("lane-host", lane_connect=5.0), gate.lookup)
    msgs = [bytes([i]) * 10_000 for i in range(60)]  # 600 kB: past every flow-control window
    asyncio.get_running_loop().call_later(0.5, gate.open, None)
    try:
        with channel(port(proxy), authority=f"localhost:{be.port}") as ch:
            got = await in_thread(
                call(ch, "ClientStream", "stream_unary"), iter(msgs), timeout=10, metadata=CANARY
            )
        assert got == f"{len(msgs)},{sum(map(len, msgs))}".encode()
        assert be.colors == [("ClientStream", "canary")]
        assert gate.calls == 1 and fallbacks(proxy, "unresolved") == 1
    finally:
        be.close()


class GoneAfterGoaway(RawUpstream):
    """A lane pod going away: its one connection answers GOAWAY, nothing listens after."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.server is not None
        self.server.close()
        await super()._serve(reader, writer)


@pytest.mark.parametrize("gone", [False, True], ids=["lane-back", "lane-gone"])
async def test_a_goaway_from_the_lane_is_retried_in_the_lane_then_falls_back(
    make_proxy: MakeProxy, gone: bool
) -> None:
    lane = await (GoneAfterGoaway if gone else RawUpstream)(goaways=1).start()
    up = await RawUpstream().start()
    proxy = await lane_proxy(make_proxy, policy(f"127.0.0.1:{lane.port}"))
    conn = await streams(proxy, f"localhost:{up.port}", [1])
    await conn.frames_until(answered(1))
    conn.close()
    if gone:  # the retry found the lane refusing: the original destination answered
        assert lane.requests == [] and up.requests == [(0, 1)]
        assert fallbacks(proxy, "refused") == 1
    else:  # the retry went to the lane again, on a new connection
        assert lane.requests == [(1, 1)] and up.requests == []
    assert answers(proxy, "200") == 1
    await up.close()
    await lane.close()


# ------------------------------------------------------ what the review of 6caa816 found


@pytest.mark.parametrize("lane_first", [True, False], ids=["lane-first", "plain-first"])
async def test_a_lane_stream_and_a_plain_stream_of_one_key_each_get_their_own_answer(
    make_proxy: MakeProxy, lane_first: bool
) -> None:
    """HTTP_PROXY mode: one stream names the route's host (its lane: a silent port),
    the other names that lane's address itself, same color, so both have one pool
    key. The lane stream falls back within lane_connect; the other is answered 504
    after timeouts.connect, on a connection of its own."""
    up = await RawUpstream().start()
    async with stuck_listener() as silent:
        proxy = await lane_proxy(make_proxy, policy(f"127.0.0.1:{silent}"))
        routed = hpack(request_fields(f"localhost:{up.port}", "/", CANARY))
        plain = hpack(request_fields(f"127.0.0.1:{silent}", "/", CANARY))
        first, second = (routed, plain) if lane_first else (plain, routed)
        conn = await RawH2.open(port(proxy))
        await conn.send(
            frame(HEADERS, END_STREAM | END_HEADERS, 1, first)
            + frame(HEADERS, END_STREAM | END_HEADERS, 3, second)
        )
        await conn.frames_until(answered(1, 3))
        conn.close()
    assert len(up.requests) == 1 and fallbacks(proxy, "timeout") == 1
    assert answers(proxy, "200") == 1 and answers(proxy, "504") == 1
    await up.close()


async def test_a_call_answered_by_its_deadline_while_waiting_is_never_sent(
    make_proxy: MakeProxy,
) -> None:
    up = await RawUpstream().start()
    gate = Gate()
    proxy = await lane_proxy(make_proxy, policy("lane-host", lane_connect=5.0), gate.lookup)
    authority = f"localhost:{up.port}"
    grpc_head = [
        (b":method", b"POST"),
        *request_fields(authority, "/t.T/ClientStream", CANARY)[1:],
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", b"200m"),
    ]
    conn = await RawH2.open(port(proxy))
    # stream 1: a client-streaming call, still sending, with a 200 ms deadline
    await conn.send(
        frame(HEADERS, END_HEADERS, 1, hpack(grpc_head)) + frame(DATA, 0, 1, b"\0\0\0\0\x03abc")
    )
    # stream 3: a plain request waiting on the same lane connection
    block = hpack(request_fields(authority, "/", CANARY))
    await conn.send(frame(HEADERS, END_STREAM | END_HEADERS, 3, block))
    await conn.frames_until(answered(1))  # DEADLINE_EXCEEDED from the proxy
    gate.open(None)  # then the lane turns out empty: stream 3 falls back, stream 1 not
    await conn.frames_until(answered(3))
    conn.close()
    assert len(up.requests) == 1 and heads(conn.frames, 1) == 1  # stream 3's only
    assert fallbacks(proxy, "unresolved") == 1
    await up.close()


async def test_a_reload_between_choosing_a_lane_and_connecting_still_falls_back(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routes go away in the loop turn between the pool taking the stream and its
    connect task starting: the router that chose the lane makes that connection."""
    up = await RawUpstream().start()
    proxy = await lane_proxy(make_proxy, policy(f"127.0.0.1:{free_port()}"))  # refuses
    assign = h2pool.H2Pool.assign

    def assign_then_reload(pool: h2pool.H2Pool, relay) -> None:
        assign(pool, relay)
        proxy.ctx.lanes = None  # a reload removed outbound.routes

    monkeypatch.setattr(h2pool.H2Pool, "assign", assign_then_reload)
    conn = await streams(proxy, f"localhost:{up.port}", [1])
    await conn.frames_until(answered(1))
    conn.close()
    assert up.requests == [(0, 1)] and answers(proxy, "200") == 1  # not a 502 from the lane
    await up.close()


async def test_a_lookup_that_does_not_answer_within_lane_connect_is_an_empty_lane(
    make_proxy: MakeProxy,
) -> None:
    """``timeout``, not ``unresolved``: the name may exist. The lookup goes on, and the
    next stream uses its answer without a new lookup."""
    lane = await RawUpstream().start()
    up = await RawUpstream().start()
    gate = Gate()
    proxy = await lane_proxy(make_proxy, policy(f"lane-host:{lane.port}"), gate.lookup)
    conn = await streams(proxy, f"localhost:{up.port}", [1])
    await conn.frames_until(answered(1), timeout=3)  # lane_connect: 0.3 s
    assert up.requests == [(0, 1)]
    assert fallbacks(proxy, "timeout") == 1 and fallbacks(proxy, "unresolved") == 0
    gate.open("127.0.0.1")  # the lookup answers late
    lanes = proxy.ctx.lanes
    assert lanes is not None
    assert await until(lambda: lanes.cache.state("lane-host")["state"] == "ready")
    block = hpack(request_fields(f"localhost:{up.port}", "/", CANARY))
    await conn.send(frame(HEADERS, END_STREAM | END_HEADERS, 3, block))
    await conn.frames_until(answered(3))
    conn.close()
    assert lane.requests == [(0, 1)] and gate.calls == 1
    await up.close()
    await lane.close()


async def test_a_lane_known_not_to_resolve_costs_no_connection_per_stream(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple] = []

    class Counted(h2pool.Upstream):
        def __init__(self, pool: h2pool.H2Pool, key: tuple) -> None:
            made.append(key)
            super().__init__(pool, key)

    monkeypatch.setattr(h2pool, "Upstream", Counted)
    up = await RawUpstream().start()
    proxy = await lane_proxy(make_proxy, policy("lane-host"), nxdomain)
    conn = await RawH2.open(port(proxy))
    block = hpack(request_fields(f"localhost:{up.port}", "/", CANARY))
    for sid in range(1, 40, 2):  # 20 streams, one after another
        await conn.send(frame(HEADERS, END_STREAM | END_HEADERS, sid, block))
        await conn.frames_until(answered(sid))
    conn.close()
    assert len(up.requests) == 20 and fallbacks(proxy, "unresolved") == 20
    # one for the first stream, which learnt the name does not resolve; one to fall back to
    assert made == [("canary", "lane-host", up.port), ("canary", "localhost", up.port)]
    await up.close()
