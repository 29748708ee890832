"""The upstream leg of HTTP/2: a GOAWAY that left streams unprocessed is retried once on a
new connection, a full connection gets a sibling of the same color, and a drain finishes
the streams in flight after telling clients GOAWAY."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sidecar.policy import Address, Timeouts
from tests.proto.conftest import MakeProxy, port, sample
from tests.proto.h2help import (
    ACK,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    RawH2,
    RawUpstream,
    call,
    channel,
    frame,
    goaway_code,
    hpack,
    in_thread,
    request_fields,
)


def answered(sid: int):
    return lambda frames: any(k == HEADERS and s == sid for k, _, s, _ in frames)


async def get(proxy, sids: list[int]) -> RawH2:
    conn = await RawH2.open(port(proxy, "inbound"))
    block = hpack(request_fields("app", "/"))
    await conn.send(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, s, block) for s in sids))
    return conn


async def test_upstream_goaway_retries_unprocessed_streams_once(make_proxy: MakeProxy) -> None:
    up = await RawUpstream(goaways=1).start()
    proxy = await make_proxy(app=Address("127.0.0.1", up.port))
    conn = await get(proxy, [1])
    frames = await conn.frames_until(answered(1))
    assert answered(1)(frames)
    assert up.connections == 2 and up.requests == [(1, 1)]  # answered on the second
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="stable", code="200"
        )
        == 1
    )
    conn.close()
    await up.close()


async def test_a_second_goaway_is_not_retried_again(make_proxy: MakeProxy) -> None:
    up = await RawUpstream(goaways=5).start()
    proxy = await make_proxy(app=Address("127.0.0.1", up.port))
    conn = await get(proxy, [1])
    await conn.frames_until(answered(1))
    assert up.connections == 2 and up.requests == []
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="stable", code="502"
        )
        == 1
    )
    conn.close()
    await up.close()


async def test_max_concurrent_streams_reached_opens_a_sibling(make_proxy: MakeProxy) -> None:
    up = await RawUpstream(max_streams=2, delay=0.3).start()
    proxy = await make_proxy(app=Address("127.0.0.1", up.port))
    first = await get(proxy, [1])
    await first.frames_until(
        lambda f: up.connections == 1 and False, timeout=0.2
    ) if False else None
    await asyncio.sleep(0.1)  # the first connection's SETTINGS (2 streams) is known now
    conn = await get(proxy, [1, 3, 5])
    await conn.frames_until(lambda f: all(answered(s)(f) for s in (1, 3, 5)))
    await first.frames_until(answered(1))
    assert up.connections == 2  # 4 streams, 2 per connection
    assert sorted(s for _, s in up.requests) == [1, 1, 3, 3]
    conn.close()
    first.close()
    await up.close()


async def test_drain_sends_goaway_and_finishes_streams_in_flight(make_proxy: MakeProxy) -> None:
    up = await RawUpstream(delay=0.3).start()
    proxy = await make_proxy(app=Address("127.0.0.1", up.port))
    conn = await get(proxy, [1])
    await asyncio.sleep(0.1)  # in flight upstream
    drained = asyncio.ensure_future(proxy.drain(5.0))
    frames = await conn.read_until_closed(timeout=5)
    await drained
    assert goaway_code(frames) == 0  # NO_ERROR, naming stream 1 as processed
    goaway = next(p for k, _, _, p in frames if k == GOAWAY)
    assert int.from_bytes(goaway[:4], "big") == 1
    assert answered(1)(frames)  # and stream 1 got its answer before the close
    assert up.requests == [(0, 1)]
    await up.close()


async def test_an_upstream_that_does_not_answer_is_504_or_deadline_exceeded(
    make_proxy: MakeProxy,
) -> None:
    up = await RawUpstream(delay=30).start()
    slow = Timeouts(header_read=5.0, idle=5.0, connect=2.0, upstream_idle=5.0, upstream_read=0.3)
    proxy = await make_proxy(app=Address("127.0.0.1", up.port), timeouts=slow)
    conn = await get(proxy, [1])
    frames = await conn.frames_until(answered(1))
    assert answered(1)(frames)
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="stable", code="504"
        )
        == 1
    )
    with channel(port(proxy, "inbound")) as ch, pytest.raises(grpc.RpcError) as info:
        await in_thread(call(ch, "Unary"), b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details() == "upstream timed out"
    conn.close()
    await up.close()


async def test_a_request_naming_the_outbound_listener_is_508(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    out = port(proxy, "outbound")
    conn = await RawH2.open(out)
    block = hpack(request_fields(f"127.0.0.1:{out}", "/"))
    await conn.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block))
    frames = await conn.frames_until(answered(1))
    assert answered(1)(frames)
    await asyncio.sleep(0.2)
    got = {"direction": "outbound", "color": "stable"}
    assert sample(proxy, "traffic_color_requests_total", code="508", **got) == 1
    h2 = {"direction": "outbound", "protocol": "http2"}
    assert sample(proxy, "traffic_color_connections_total", **h2) == 1  # no second hop
    conn.close()


async def test_an_upstream_reset_reaches_the_client_with_its_code(make_proxy: MakeProxy) -> None:
    up = await RawUpstream(reset=0x8).start()  # CANCEL
    proxy = await make_proxy(app=Address("127.0.0.1", up.port))
    conn = await get(proxy, [1])

    def reset(frames: list) -> bool:
        return any(k == RST_STREAM and s == 1 for k, _, s, _ in frames)

    frames = await conn.frames_until(reset)
    rst = next(p for k, _, s, p in frames if k == RST_STREAM and s == 1)
    assert int.from_bytes(rst, "big") == 0x8
    # (what was queued behind the reset, the head and DATA here, is dropped with the stream)
    conn.close()
    await up.close()


async def test_ping_is_answered(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    conn = await RawH2.open(port(proxy, "inbound"))
    await conn.send(frame(PING, 0, 0, b"tc-ping!"))
    frames = await conn.frames_until(lambda f: any(k == PING for k, _, _, _ in f))
    assert (PING, ACK, 0, b"tc-ping!") in frames
    conn.close()
