"""What RFC 9112 asks of a proxy where an adversarial probe found it wanting (issue 17).

Each test sends what the probe sent, through the real proxy to a real upstream,
and checks what nginx 1.22 did with the same input: tunnels that only upload stay
open, a rejected upload's answer arrives instead of a reset, HTTP/1.0 with
Transfer-Encoding is faulty framing, an inbound absolute-form authority is checked
before it becomes the app's Host, ``OPTIONS`` with an empty path goes on as
``OPTIONS *``, and Transfer-Encoding never reaches a client where it is forbidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket

import pytest
import websockets

from sidecar.policy import Address, Timeouts
from sidecar.proxy import Proxy
from tests.proto.backend import Backend
from tests.proto.conftest import MakeProxy, port, raw, request, until, upstream


def blocking_exchange(proxy_port: int, *parts: bytes) -> bytes:
    """Send ``parts`` with blocking ``sendall`` (as a simple client does, reading nothing
    until it has sent everything), then read to EOF; a reset raises ConnectionError."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as s:
        for part in parts:
            s.sendall(part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


IDLE = Timeouts(header_read=5.0, idle=1.0, connect=2.0, upstream_idle=5.0, drain=2.0)


# ---------------------------------------------------------------- 1. upload-only tunnels


async def test_connect_tunnel_that_only_uploads_is_not_idle(make_proxy: MakeProxy) -> None:
    got: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            got.append(line)
        writer.close()

    proxy = await make_proxy(timeouts=IDLE)
    async with upstream(sink) as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
        target = f"127.0.0.1:{up}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        # Three idle periods of sending only: the client's bytes are activity too.
        for i in range(10):
            writer.write(b"line %d\n" % i)
            await writer.drain()
            await asyncio.sleep(0.3)
        assert not reader.at_eof()
        writer.write(b"last\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        assert got == [b"line %d\n" % i for i in range(10)] + [b"last\n"]
        # Silent both ways: now the idle timeout closes it.
        assert await asyncio.wait_for(reader.read(), 4) == b""
        writer.close()


async def test_websocket_client_that_only_sends_is_not_idle(make_proxy: MakeProxy) -> None:
    received: list[str] = []

    async def handler(ws: websockets.ServerConnection) -> None:
        async for message in ws:
            received.append(str(message))

    async with websockets.serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        ws_port = server.sockets[0].getsockname()[1]
        proxy = await make_proxy(timeouts=IDLE)
        # The URI names the upstream (the Host header); the socket goes to the proxy.
        async with websockets.connect(
            f"ws://127.0.0.1:{ws_port}/feed",
            host="127.0.0.1",
            port=port(proxy),
            ping_interval=None,  # no pings: the only traffic is the client's uploads
        ) as ws:
            for i in range(10):
                await ws.send(f"event {i}")
                await asyncio.sleep(0.3)
            await ws.send("done")
            for _ in range(50):
                if len(received) == 11:
                    break
                await asyncio.sleep(0.05)
    assert received == [f"event {i}" for i in range(10)] + ["done"]


# ---------------------------------------------------------------- 2. a rejected upload


@pytest.mark.parametrize("side", ["outbound", "inbound"])
async def test_rejected_upload_reads_its_413_not_a_reset(make_proxy: MakeProxy, side: str) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\n"
            b"too large"
        )
        await writer.drain()
        # Discard the rest, as a server that closes lingeringly would (nginx does).
        try:
            while await asyncio.wait_for(reader.read(1 << 16), 2):
                pass
        except (TimeoutError, ConnectionError):
            pass
        writer.close()

    async with upstream(refuse) as up:
        proxy = await make_proxy(app=Address("127.0.0.1", up))
        body = b"x" * (20 << 20)

        def post() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port(proxy, side), timeout=10)
            try:
                conn.request("POST", "/upload", body=body, headers={"Host": f"127.0.0.1:{up}"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        for _ in range(4):
            status, text = await asyncio.to_thread(post)
            assert (status, text) == (413, b"too large")


@pytest.mark.parametrize("side", ["outbound", "inbound"])
async def test_upload_to_an_unreachable_upstream_reads_its_502(
    make_proxy: MakeProxy, side: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = await make_proxy(app=Address("127.0.0.1", dead))

    def post() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port(proxy, side), timeout=10)
        try:
            conn.request("POST", "/", body=b"x" * (20 << 20), headers={"Host": f"127.0.0.1:{dead}"})
            return conn.getresponse().status
        finally:
            conn.close()

    for _ in range(3):
        assert await asyncio.to_thread(post) == 502


async def test_upload_behind_a_refused_pipelined_request_reads_the_answers(
    proxy: Proxy, backend: Backend
) -> None:
    """Refused while an earlier request is answered (no request being parsed then): the
    client still sending gets every answer, not a reset."""
    host = f"127.0.0.1:{backend.port}"

    upload = b"POST /c HTTP/1.1\r\nHost: %s\r\nContent-Length: 20000000\r\n\r\n" % host.encode()
    parts = (
        request("GET", "/hold?s=0.5", host),
        request("GET", "/big-head", host, {"X-Big": "v" * 70_000}),
        upload + b"x" * (20 << 20),
    )

    out = await asyncio.to_thread(blocking_exchange, port(proxy), *parts)
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 431 " in out
    assert [r.target for r in backend.requests] == ["/hold?s=0.5"]


async def test_upload_behind_pipelined_requests_survives_a_drain(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    """Drain answers the request in flight with ``Connection: close``; the requests queued
    behind it are still arriving, so the client reads that answer instead of a reset."""
    proxy = await make_proxy()
    host = f"127.0.0.1:{backend.port}"

    upload = b"POST /c HTTP/1.1\r\nHost: %s\r\nContent-Length: 20000000\r\n\r\n" % host.encode()
    parts = (request("GET", "/hold?s=0.5", host) + request("GET", "/b", host), upload)

    sending = asyncio.ensure_future(
        asyncio.to_thread(blocking_exchange, port(proxy), *parts, b"x" * (20 << 20))
    )
    assert await until(lambda: bool(backend.requests), timeout=3)
    await proxy.drain(3.0)
    out = await sending
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in out.partition(b"\r\n\r\n")[0].lower()


async def test_a_client_dripping_its_head_is_not_held_past_its_timeout(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    """The 408 of the header-read timeout closes at once: no lingering for a slowloris."""
    proxy = await make_proxy(timeouts=Timeouts(header_read=0.5, idle=5.0, connect=2.0))
    _, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\nX-Slow: ".encode())
    conns = proxy._shared.conns  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    start = loop.time()
    with contextlib.suppress(ConnectionError):
        while conns and loop.time() - start < 6:
            writer.write(b"v")
            await asyncio.sleep(0.2)
    assert not conns, "the dripping client was still held"
    assert loop.time() - start < 3
    writer.close()


async def test_a_client_uploading_when_the_upstream_dies_mid_answer_sees_a_failure(
    proxy: Proxy,
) -> None:
    """Not lingering here: a clean FIN would end a close-delimited HTTP/1.0 answer and
    pass the cut-off response for a complete one."""

    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async with upstream(die) as up:
        head = f"POST / HTTP/1.0\r\nHost: 127.0.0.1:{up}\r\nContent-Length: 20000000\r\n\r\n"
        with pytest.raises(ConnectionError):
            await asyncio.to_thread(
                blocking_exchange, port(proxy), head.encode(), b"x" * (20 << 20)
            )


async def test_a_half_close_mid_request_is_not_lingered_on(proxy: Proxy, backend: Backend) -> None:
    """The client said it is done sending: the 400 closes at once, nothing to wait for."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    writer.write(f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n".encode())
    writer.write(b"Content-Length: 100\r\n\r\nshort")
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 3)
    assert out.startswith(b"HTTP/1.1 400 ")
    conns = proxy._shared.conns  # type: ignore[union-attr]
    assert await until(lambda: not conns, timeout=1.0)
    writer.close()


# ---------------------------------------------------------------- 3. HTTP/1.0 and Transfer-Encoding


async def test_http10_request_with_transfer_encoding_is_refused(
    proxy: Proxy, backend: Backend
) -> None:
    host = f"127.0.0.1:{backend.port}"
    data = (
        f"POST /1 HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        f"GET /2 HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    for side in ("outbound", "inbound"):
        out = await raw(port(proxy, side), data)
        assert out.startswith(b"HTTP/1.1 400 "), out[:200]
        assert out.count(b"HTTP/1.1 ") == 1  # closed after the answer: /2 never read
    assert backend.requests == []


async def test_http10_response_with_transfer_encoding_is_not_reused(proxy: Proxy) -> None:
    connections = 0

    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
            await writer.drain()

    async with upstream(old_server) as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
        for path in ("/a", "/b"):
            writer.write(request("GET", path, f"127.0.0.1:{up}"))
            resp = await _read_chunked_response(reader)
            assert resp == b"hello"
        writer.close()
    assert connections == 2


async def _read_chunked_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if not size:
            return body
        body += data[:-2]


# ---------------------------------------------------------------- 4. inbound absolute-form


@pytest.mark.parametrize(
    "target",
    ["http://user:pw@good.example/p", "http:///p", "http://[::1/p", "http://h:99999/p"],
)
async def test_inbound_absolute_form_with_a_bad_authority_is_400(
    proxy: Proxy, backend: Backend, target: str
) -> None:
    out = await raw(port(proxy, "inbound"), request("GET", target, "app"))
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert backend.requests == []


async def test_inbound_absolute_form_with_a_good_authority_becomes_host(
    proxy: Proxy, backend: Backend
) -> None:
    out = await raw(
        port(proxy, "inbound"),
        b"GET http://good.example:8080/p HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    assert backend.requests[-1].header("host") == ["good.example:8080"]
    assert backend.requests[-1].target == "/p"


@pytest.mark.parametrize("host", ["user:pw@good.example", "h:99999", "[::1", ""])
async def test_inbound_origin_form_with_a_bad_host_is_400(
    proxy: Proxy, backend: Backend, host: str
) -> None:
    out = await raw(port(proxy, "inbound"), f"GET /p HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert backend.requests == []


# ---------------------------------------------------------------- 5. OPTIONS *


async def test_options_with_an_empty_path_goes_on_as_asterisk(
    proxy: Proxy, backend: Backend
) -> None:
    host = f"127.0.0.1:{backend.port}"
    for side in ("outbound", "inbound"):
        out = await raw(
            port(proxy, side),
            f"OPTIONS http://{host} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert out.startswith(b"HTTP/1.1 200 ")
        assert backend.requests[-1].method == "OPTIONS"
        assert backend.requests[-1].target == "*"


# ---------------------------------------------------------------- 6. forbidden Transfer-Encoding


async def test_no_content_response_never_carries_transfer_encoding(proxy: Proxy) -> None:
    async def no_content(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nx-a: 1\r\n\r\n")
            await writer.drain()

    async with upstream(no_content) as up:
        host = f"127.0.0.1:{up}"
        for version in ("1.1", "1.0"):
            out = await raw(
                port(proxy),
                f"GET / HTTP/{version}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert out.startswith(b"HTTP/1.1 204 "), out
            assert b"transfer-encoding" not in out.lower()
            assert b"x-a: 1" in out


async def test_head_from_an_http10_client_gets_no_transfer_encoding(
    proxy: Proxy, backend: Backend
) -> None:
    host = f"127.0.0.1:{backend.port}"
    head10 = f"HEAD /chunked?n=3 HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
    out = await raw(port(proxy), head10)
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in out.lower()
    # An HTTP/1.1 client may still be told how a GET would have been coded.
    head11 = f"HEAD /chunked?n=3 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    out = await raw(port(proxy), head11)
    assert b"transfer-encoding: chunked" in out.lower()


async def test_close_delimited_coded_body_is_refused_to_http10_not_corrupted(
    proxy: Proxy,
) -> None:
    """A coding other than chunked cannot be named to HTTP/1.0, and unnamed it would pass
    for the content: 502. HTTP/1.1 clients get it named, re-chunked."""

    async def gzip_until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\ncoded-bytes")
        await writer.drain()
        writer.close()

    async with upstream(gzip_until_close) as up:
        out = await raw(port(proxy), f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{up}\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 502 "), out[:200]
        assert b"coded-bytes" not in out
        out = await raw(
            port(proxy),
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{up}\r\nConnection: close\r\n\r\n".encode(),
        )
        head = out.partition(b"\r\n\r\n")[0].lower()
        assert b"transfer-encoding: gzip, chunked" in head
