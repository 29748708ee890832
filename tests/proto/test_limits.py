"""What the proxy refuses, and how it fails: limits, malformed input, timeouts, dead upstreams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from sidecar.policy import Address, Timeouts
from sidecar.proxy import Proxy
from tests.proto.backend import Backend
from tests.proto.conftest import (
    Conn,
    MakeProxy,
    curl,
    port,
    raw,
    request,
    sample,
    stuck_listener,
    upstream,
)


def status_of(out: bytes) -> int:
    assert out.startswith(b"HTTP/1.1 "), out[:200]
    return int(out[9:12])


BAD_INPUTS = [
    pytest.param(lambda h: f"GET /{'a' * 9000} HTTP/1.1\r\nHost: {h}\r\n\r\n", 414, id="uri-414"),
    pytest.param(
        lambda h: (
            f"GET / HTTP/1.1\r\nHost: {h}\r\n"
            + "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(70))
            + "\r\n"
        ),
        431,
        id="headers-431",
    ),
    pytest.param(
        lambda h: f"GET / HTTP/1.1\r\nHost: {h}\r\nX-Big: {'v' * 70000}\r\n\r\n",
        431,
        id="one-huge-header-431",
    ),
    pytest.param(
        lambda h: (
            f"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
        400,
        id="cl-and-te-400",
    ),
    pytest.param(
        lambda h: f"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5x\r\n\r\nhello",
        400,
        id="invalid-cl-400",
    ),
    pytest.param(
        lambda h: f"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        400,
        id="conflicting-cl-400",
    ),
    pytest.param(lambda h: "HELLO THERE\r\n\r\n", 400, id="garbage-400"),
    pytest.param(lambda h: f"GET / HTTP/2.0\r\nHost: {h}\r\n\r\n", 505, id="http2-line-505"),
    pytest.param(
        lambda h: f"GET / HTTP/0.9\r\nHost: {h}\r\nConnection: keep-alive\r\n\r\n",
        505,
        id="http09-line-505",
    ),
    pytest.param(lambda h: f"GET / HTTP/1.1\nHost: {h}\n\n", 400, id="bare-lf-400"),
    pytest.param(lambda h: "GET / HTTP/1.1\r\n\r\n", 400, id="no-host-400"),
    pytest.param(lambda h: "GET https://secure.example/ HTTP/1.1\r\n\r\n", 400, id="https-abs-400"),
]


@pytest.mark.parametrize(("make", "status"), BAD_INPUTS)
async def test_bad_input_is_refused_and_never_reaches_upstream(
    proxy: Proxy, backend: Backend, make, status: int
) -> None:
    out = await raw(port(proxy), make(f"127.0.0.1:{backend.port}").encode())
    assert status_of(out) == status
    assert b"connection: close" in out.lower()
    assert backend.connections == 0 and backend.requests == []
    assert (
        sample(
            proxy,
            "traffic_color_requests_total",
            direction="outbound",
            color="stable",
            code=str(status),
        )
        == 1
    )


async def test_large_header_block_sent_slowly_is_refused(proxy: Proxy, backend: Backend) -> None:
    """A head that grows over many reads is bounded too, not only a complete one; the
    client, still sending, reads its 431 (a lingering close), not a reset."""
    conn = await Conn.open(port(proxy))
    await conn.send(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\nX-Big: ".encode())
    for _ in range(200):
        await conn.send(b"v" * 1024)
        await asyncio.sleep(0)
    resp = await conn.response()
    assert resp.status == 431
    assert await conn.closed()
    conn.close()
    assert backend.connections == 0


async def test_bad_pipelined_request_answers_the_good_ones_first(
    proxy: Proxy, backend: Backend
) -> None:
    host = f"127.0.0.1:{backend.port}"
    data = request("GET", "/good", host) + b"BAD REQUEST LINE\r\n\r\n"
    out = await raw(port(proxy), data)
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 400" in rest
    assert backend.paths() == ["/good"]


async def test_inbound_refuses_connect(proxy: Proxy, backend: Backend) -> None:
    out = await raw(port(proxy, "inbound"), b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 405
    assert backend.connections == 0


async def test_request_to_the_proxy_itself_is_a_loop(proxy: Proxy) -> None:
    own = f"127.0.0.1:{port(proxy)}"
    out = await raw(port(proxy), request("GET", f"http://{own}/", own))
    assert status_of(out) == 508


# ---------------------------------------------------------------- timeouts


async def test_slowloris_head_times_out(make_proxy: MakeProxy, backend: Backend) -> None:
    proxy = await make_proxy(timeouts=Timeouts(header_read=0.3, idle=5, connect=1, upstream_idle=5))
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    writer.write(b"GET / HTTP/1.1\r\n")
    got = b""
    # A byte every 50 ms keeps the socket busy but must not extend the head's deadline.
    for _ in range(60):
        try:
            writer.write(b"X")
            got = await asyncio.wait_for(reader.read(1000), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        break
    assert got.startswith(b"HTTP/1.1 408"), got
    writer.close()
    assert backend.connections == 0


async def test_silent_connection_is_closed_after_header_read_timeout(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(timeouts=Timeouts(header_read=0.2, idle=5, connect=1, upstream_idle=5))
    conn = await Conn.open(port(proxy))
    assert await conn.closed(3)
    conn.close()


async def test_idle_keep_alive_connection_times_out(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy = await make_proxy(timeouts=Timeouts(header_read=5, idle=0.3, connect=1, upstream_idle=5))
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/", f"127.0.0.1:{backend.port}"))
    assert (await conn.response()).status == 200
    assert await conn.closed(3)
    assert conn.buf == b""  # closed quietly, nothing half-sent
    conn.close()


async def test_idle_upstream_connections_are_closed(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy = await make_proxy(timeouts=Timeouts(header_read=5, idle=5, connect=1, upstream_idle=0.2))
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/", f"127.0.0.1:{backend.port}"))
    assert (await conn.response()).status == 200
    assert proxy.open_flows() == {"stable": 1}
    for _ in range(300):
        if not proxy.open_flows():
            break
        await asyncio.sleep(0.01)
    assert proxy.open_flows() == {}
    conn.close()


# ---------------------------------------------------------------- upstream failures


async def test_connect_refused_is_502_naming_the_upstream(proxy: Proxy) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    code, out, err = await curl(
        "-x", f"http://127.0.0.1:{port(proxy)}", "-i", f"http://127.0.0.1:{dead}/"
    )
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 502")
    assert f"127.0.0.1:{dead}".encode() in out.split(b"\r\n\r\n", 1)[1]
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="stable", code="502"
        )
        == 1
    )


async def test_inbound_app_down_is_502(make_proxy: MakeProxy) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = await make_proxy(app=Address("127.0.0.1", dead))
    out = await raw(port(proxy, "inbound"), request("GET", "/", "app"), half_close=True)
    assert status_of(out) == 502


async def test_connect_timeout_is_504(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(timeouts=Timeouts(header_read=5, idle=5, connect=0.3, upstream_idle=5))
    async with stuck_listener() as stuck:
        conn = await Conn.open(port(proxy))
        await conn.send(request("GET", "/", f"127.0.0.1:{stuck}"))
        resp = await conn.response(timeout=5)
        conn.close()
    assert resp.status == 504
    assert f"127.0.0.1:{stuck}".encode() in resp.body


@pytest.mark.parametrize("path", ["/die", "/die-chunked"])
async def test_upstream_dying_mid_response_closes_the_client(
    proxy: Proxy, backend: Backend, path: str
) -> None:
    code, out, _ = await curl(
        "-x", f"http://127.0.0.1:{port(proxy)}", f"http://127.0.0.1:{backend.port}{path}"
    )
    assert code == 18  # curl: "transfer closed with outstanding read data remaining"
    assert not out.endswith(b"\n") or len(out) < 1000


async def test_upstream_dying_before_its_head_is_502(proxy: Proxy, backend: Backend) -> None:
    out = await raw(
        port(proxy), request("GET", "/die-head", f"127.0.0.1:{backend.port}"), half_close=True
    )
    assert status_of(out) == 502


# ---------------------------------------------------------------- silent upstreams

READ = Timeouts(header_read=5.0, idle=5.0, connect=2.0, upstream_idle=5.0, upstream_read=0.5)


@contextlib.asynccontextmanager
async def scripted_upstream(*steps: bytes | float) -> AsyncIterator[int]:
    """An upstream that reads a request head, then writes bytes and sleeps as told,
    then holds the connection open without a word."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            for step in steps:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                else:
                    await asyncio.sleep(step)
            await reader.read()  # until the proxy lets go
        writer.close()

    async with upstream(serve) as port_:
        yield port_


async def test_silent_upstream_is_504_and_the_client_connection_goes_on(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy = await make_proxy(timeouts=READ)
    async with scripted_upstream() as up:
        conn = await Conn.open(port(proxy))
        t0 = asyncio.get_running_loop().time()
        await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
        resp = await conn.response(timeout=5)
        waited = asyncio.get_running_loop().time() - t0
        assert resp.status == 504
        assert f"upstream 127.0.0.1:{up} sent nothing for 0.5s".encode() in resp.body
        assert 0.5 <= waited < 2  # the sweeper looks at least every 0.125 s here
        # The client's keep-alive connection is still good for the next request.
        await conn.send(request("GET", "/after", f"127.0.0.1:{backend.port}"))
        assert (await conn.response()).status == 200
        conn.close()
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="stable", code="504"
        )
        == 1
    )


async def test_upstream_stalling_mid_body_cuts_the_client_off(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(timeouts=READ)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
    async with scripted_upstream(head) as up:
        out = await raw(port(proxy), request("GET", "/", f"127.0.0.1:{up}"), timeout=5)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.endswith(b"\r\n\r\nhalf")  # closed after what came: never a faked ending


async def test_slow_upstream_that_keeps_sending_is_not_cut(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(timeouts=READ)
    steps: list[bytes | float] = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]
    for byte in (b"a", b"b", b"c", b"d", b"e"):
        steps += [0.3, byte]  # 1.5 s in all, never 0.5 s silent
    async with scripted_upstream(*steps) as up:
        conn = await Conn.open(port(proxy))
        await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
        resp = await conn.response(timeout=5)
        conn.close()
    assert resp.status == 200 and resp.body == b"abcde"
