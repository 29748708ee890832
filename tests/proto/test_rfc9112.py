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
import http.client

import pytest
import websockets

from sidecar.policy import Address, Timeouts
from sidecar.proxy import Proxy
from tests.proto.backend import Backend
from tests.proto.conftest import MakeProxy, port, raw, request, upstream

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


async def test_close_delimited_coded_body_reaches_http10_without_transfer_encoding(
    proxy: Proxy,
) -> None:
    async def gzip_until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\ncoded-bytes")
        await writer.drain()
        writer.close()

    async with upstream(gzip_until_close) as up:
        out = await raw(port(proxy), f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{up}\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"coded-bytes"
