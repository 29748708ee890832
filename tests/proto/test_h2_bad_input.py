"""Bad HTTP/2 input, sent as raw frames: each is refused (a stream error, or GOAWAY with
the reason) while a well-behaved connection opened before it is served throughout."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from sidecar.policy import Address
from sidecar.proxy import Proxy
from tests.proto.conftest import MakeProxy, port, sample
from tests.proto.h2help import (
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    Nghttpd,
    RawH2,
    _int,
    frame,
    goaway_code,
    hpack,
    request_fields,
)


@pytest.fixture(scope="module")
def nghttpd() -> Iterator[Nghttpd]:
    server = Nghttpd({"100": 100})
    yield server
    server.close()


class Good:
    """A well-behaved client connection: one GET at a time, each answered in full."""

    def __init__(self, conn: RawH2) -> None:
        self.conn = conn
        self.sid = 1

    async def get(self) -> None:
        sid = self.sid
        self.sid += 2
        block = hpack(request_fields("app", "/100"))
        await self.conn.send(frame(HEADERS, END_STREAM | END_HEADERS, sid, block))

        def done(frames: list) -> bool:
            return any(k == DATA and f & END_STREAM and s == sid for k, f, s, _ in frames)

        frames = await self.conn.frames_until(done)
        assert done(frames), f"stream {sid} not answered: {frames[-5:]}"
        body = b"".join(p for k, _, s, p in frames if k == DATA and s == sid)
        assert len(body) == 100


@pytest.fixture
async def setup(make_proxy: MakeProxy, nghttpd: Nghttpd) -> AsyncIterator[tuple[Proxy, Good]]:
    proxy = await make_proxy(app=Address("127.0.0.1", nghttpd.port))
    good = Good(await RawH2.open(port(proxy, "inbound")))
    await good.get()
    yield proxy, good
    await good.get()  # still served after the bad connection was dealt with
    good.conn.close()


async def bad(proxy: Proxy, rcvbuf: int | None = None) -> RawH2:
    if rcvbuf is None:
        return await RawH2.open(port(proxy, "inbound"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port(proxy, "inbound")))
    conn = RawH2(*await asyncio.open_connection(sock=sock))
    conn.writer.write(PREFACE + frame(SETTINGS, 0, 0))
    return conn


async def test_header_list_over_64k_is_431_and_the_connection_lives(setup: tuple) -> None:
    proxy, _ = setup
    conn = await bad(proxy)
    fields = request_fields("app", "/100", [(f"x-big-{i}", "v" * 7000) for i in range(10)])
    block = hpack(fields)
    chunks = [block[i : i + 16000] for i in range(0, len(block), 16000)]
    data = frame(HEADERS, END_STREAM, 1, chunks[0])
    for i, c in enumerate(chunks[1:], 1):
        data += frame(CONTINUATION, END_HEADERS if i == len(chunks) - 1 else 0, 1, c)
    await conn.send(data)
    frames = await conn.frames_until(lambda f: any(k == HEADERS and s == 1 for k, _, s, _ in f))
    assert any(k == HEADERS and s == 1 for k, _, s, _ in frames)
    assert goaway_code(frames) is None  # a stream error only
    conn2 = Good(conn)
    conn2.sid = 3
    await conn2.get()  # the same connection serves the next request
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="stable", code="431"
        )
        == 1
    )
    conn.close()


async def test_continuation_flood_ends_in_goaway(setup: tuple) -> None:
    proxy, _ = setup
    conn = await bad(proxy)
    data = frame(HEADERS, 0, 1, hpack(request_fields("app", "/")))
    data += b"".join(frame(CONTINUATION, 0, 1, hpack([(b"x-c", b"y")])) for _ in range(5000))
    await conn.send(data)
    frames = await conn.read_until_closed()
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert not any(k == HEADERS for k, _, _, _ in frames)  # nothing was forwarded


async def test_rapid_reset_is_enhance_your_calm_and_resets_upstream(setup: tuple) -> None:
    proxy, _ = setup
    conn = await bad(proxy)
    block = hpack([*request_fields("app", "/100"), (b"content-length", b"10")])
    rst = (8).to_bytes(4, "big")  # CANCEL
    # Requests whose bodies never come: their upstream streams stay open...
    await conn.send(b"".join(frame(HEADERS, END_HEADERS, sid, block) for sid in range(1, 100, 2)))
    h2 = proxy._door.h2
    for _ in range(200):
        if sum(len(c.streams) for c in h2.pool.open) == 50:
            break
        await asyncio.sleep(0.01)
    assert sum(len(c.streams) for c in h2.pool.open) == 50
    # ...then they are reset, and a burst of streams opened and reset at once follows.
    burst = b"".join(frame(RST_STREAM, 0, sid, rst) for sid in range(1, 100, 2))
    burst += b"".join(
        frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, rst)
        for sid in range(101, 101 + 2 * 1500, 2)
    )
    await conn.send(burst)
    frames = await conn.read_until_closed(timeout=10)
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    for _ in range(200):  # every upstream stream those requests opened is reset
        if not any(c.streams for c in h2.pool.open):
            break
        await asyncio.sleep(0.01)
    assert not any(c.streams for c in h2.pool.open)


@pytest.mark.parametrize("kind", [SETTINGS, PING])
async def test_settings_and_ping_floods_end_the_connection(setup: tuple, kind: int) -> None:
    """A client that sends and never reads: the acknowledgements owed to it are bounded."""
    proxy, _ = setup
    conn = await bad(proxy, rcvbuf=4096)
    one = frame(SETTINGS, 0, 0) if kind == SETTINGS else frame(PING, 0, 0, b"12345678")
    closed = False
    for _ in range(200):
        try:
            conn.writer.write(one * 5000)
            await asyncio.wait_for(conn.writer.drain(), 0.5)
        except (ConnectionError, TimeoutError):
            closed = True
            break
    frames = await conn.read_until_closed(timeout=20)
    assert closed or goaway_code(frames) == ENHANCE_YOUR_CALM
    assert goaway_code(frames) in (ENHANCE_YOUR_CALM, None)


async def test_data_on_stream_zero_is_goaway_protocol_error(setup: tuple) -> None:
    proxy, _ = setup
    conn = await bad(proxy)
    await conn.send(frame(DATA, 0, 0, b"x"))
    frames = await conn.read_until_closed()
    assert goaway_code(frames) == PROTOCOL_ERROR


async def test_hpack_table_size_over_the_limit_is_compression_error(setup: tuple) -> None:
    proxy, _ = setup
    conn = await bad(proxy)
    block = _int(1 << 20, 5, 0x20) + hpack(request_fields("app", "/100"))
    await conn.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block))
    frames = await conn.read_until_closed()
    assert goaway_code(frames) == COMPRESSION_ERROR


async def test_a_goaway_from_the_client_is_answered_by_closing(setup: tuple) -> None:
    proxy, _ = setup
    conn = await bad(proxy)
    await conn.send(frame(GOAWAY, 0, 0, (0).to_bytes(8, "big")))
    await conn.read_until_closed()
