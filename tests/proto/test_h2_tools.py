"""Plain HTTP/2 through the sidecar with Debian's clients and server: curl
--http2-prior-knowledge, nghttp, h2load (bounded) against nghttpd; failures as
HTTP statuses; flow control that stops a fast upstream for a slow client."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import pytest

from sidecar.policy import Address
from sidecar.proxy.http2.binding import STREAM_WINDOW, buffered
from sidecar.proxy.http2.stream import HIGH_WATER
from tests.proto.conftest import MakeProxy, port, sample
from tests.proto.h2help import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    WINDOW_UPDATE,
    Nghttpd,
    RawH2,
    frame,
    free_port,
    hpack,
    request_fields,
)

BIG = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def nghttpd() -> Iterator[Nghttpd]:
    server = Nghttpd({"100": 100, "big": BIG})
    yield server
    server.close()


async def run(*args: str, timeout: float = 60) -> tuple[int, bytes]:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} missing: make install puts it there (nghttp2-client, curl)")
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out


async def test_curl_both_sides(make_proxy: MakeProxy, nghttpd: Nghttpd) -> None:
    proxy = await make_proxy(app=Address("127.0.0.1", nghttpd.port))
    out, inb = port(proxy, "outbound"), port(proxy, "inbound")
    url = f"http://127.0.0.1:{nghttpd.port}/big"
    rc, body = await run(
        "curl", "-sS", "--http2-prior-knowledge", "--connect-to", f"::127.0.0.1:{out}", url
    )
    assert rc == 0 and body == nghttpd.body("big")
    rc, body = await run("curl", "-sS", "--http2-prior-knowledge", f"http://127.0.0.1:{inb}/100")
    assert rc == 0 and body == nghttpd.body("100")
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="stable", code="200"
        )
        == 1
    )


async def test_nghttp_and_h2load(make_proxy: MakeProxy, nghttpd: Nghttpd) -> None:
    proxy = await make_proxy(app=Address("127.0.0.1", nghttpd.port))
    inb = port(proxy, "inbound")
    rc, out = await run(
        "nghttp", "-nv", "-H", "x-traffic-color: canary", f"http://127.0.0.1:{inb}/100"
    )
    assert rc == 0, out
    assert b":status: 200" in out
    rc, out = await run(
        "h2load", "-n", "2000", "-c", "4", "-m", "16", f"http://127.0.0.1:{inb}/100"
    )
    assert rc == 0, out
    assert b"2000 succeeded, 0 failed, 0 errored" in out
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="stable", code="200"
        )
        == 2000
    )
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="canary", code="200"
        )
        == 1
    )
    assert proxy.open_flows() == {"stable": 1, "canary": 1}


async def test_failures_are_http_statuses_for_plain_clients(make_proxy: MakeProxy) -> None:
    dead = free_port()
    proxy = await make_proxy(app=Address("127.0.0.1", dead))
    _, out = await run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge",
        f"http://127.0.0.1:{port(proxy, 'inbound')}/",
    )  # fmt: skip
    assert out == b"502"
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="stable", code="502"
        )
        == 1
    )


async def test_a_slow_reader_stops_its_writer_and_gets_every_byte(
    make_proxy: MakeProxy, nghttpd: Nghttpd
) -> None:
    """The client opens no window beyond the first 64 KiB: the proxy holds a bounded
    amount for the stream, and the rest arrives, intact, once the client reads on."""
    proxy = await make_proxy(app=Address("127.0.0.1", nghttpd.port))
    conn = await RawH2.open(port(proxy, "inbound"))
    block = hpack(request_fields("app", "/big"))
    await conn.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block))
    await asyncio.sleep(1.0)  # the upstream would send all 8 MiB in this time if let
    h2 = proxy._door.h2
    (down,) = h2.downs
    (relay,) = down.relays.values()
    held = buffered(relay.down_q)  # received from the upstream, not yet sent on
    assert 0 < held <= STREAM_WINDOW + HIGH_WATER
    got = 0
    frames_seen = 0

    def body_bytes(frames: list) -> int:
        return sum(len(p) for k, _, sid, p in frames if k == DATA and sid == 1)

    frames = await conn.frames_until(lambda f: body_bytes(f) >= 65535)
    got = body_bytes(frames)
    assert got == 65535  # the client's initial window, not a byte more
    frames_seen = len(frames)
    # Open the windows wide: the whole body arrives.
    inc = (BIG).to_bytes(4, "big")
    await conn.send(frame(WINDOW_UPDATE, 0, 0, inc) + frame(WINDOW_UPDATE, 0, 1, inc))
    frames = await conn.frames_until(
        lambda f: any(k == DATA and fl & END_STREAM for k, fl, _, _ in f), timeout=20
    )
    assert len(frames) > frames_seen
    body = b"".join(p for k, _, sid, p in frames if k == DATA and sid == 1)
    assert body == nghttpd.body("big")
    conn.close()


async def test_a_captured_destination_names_the_upstream(
    make_proxy: MakeProxy, nghttpd: Nghttpd
) -> None:
    """As the front door hands captured connections over: outbound goes to the original
    destination whatever ``:authority`` says; inbound to the app on the port dialled."""
    from sidecar.proxy.http2 import H2Side

    proxy = await make_proxy(app=Address("127.0.0.1", 1))  # the app's own port: unused
    loop = asyncio.get_running_loop()
    side = H2Side(proxy.ctx, loop)
    dst = ("127.0.0.1", nghttpd.port)
    servers = [
        await loop.create_server(lambda d=d: side.protocol(d, dst), "127.0.0.1", 0)
        for d in ("outbound", "inbound")
    ]
    try:
        for server in servers:
            p = server.sockets[0].getsockname()[1]
            url = "http://elsewhere.invalid:81/100"
            rc, body = await run(
                "curl", "-sS", "--http2-prior-knowledge", "--connect-to", f"::127.0.0.1:{p}", url
            )  # fmt: skip
            assert rc == 0 and body == nghttpd.body("100")
    finally:
        for server in servers:
            server.close()
        await side.drain(1.0)


async def test_a_closed_connection_is_freed_without_a_garbage_collection(
    make_proxy: MakeProxy, nghttpd: Nghttpd
) -> None:
    """The session and its connection hold each other; closing breaks that at once."""
    import gc
    import weakref

    proxy = await make_proxy(app=Address("127.0.0.1", nghttpd.port))
    rc, _ = await run(
        "curl", "-sS", "--http2-prior-knowledge", f"http://127.0.0.1:{port(proxy, 'inbound')}/100"
    )
    assert rc == 0
    gc.collect()
    gc.disable()
    try:
        conn = await RawH2.open(port(proxy, "inbound"))
        await conn.send(
            frame(HEADERS, END_STREAM | END_HEADERS, 1, hpack(request_fields("a", "/100")))
        )
        await conn.frames_until(lambda f: any(k == DATA and fl & END_STREAM for k, fl, _, _ in f))
        (down,) = proxy._door.h2.downs
        ref = weakref.ref(down)
        del down
        conn.close()
        for _ in range(100):
            if ref() is None:
                break
            await asyncio.sleep(0.01)
        assert ref() is None
    finally:
        gc.enable()
