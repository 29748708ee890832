"""HTTP/1.x semantics probed with real clients: framing, loops, bounds, half-closes, resets.

Each test is a bug that was found by poking the proxy the way a hostile or sloppy
peer would; the names say what a user sees when it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from sidecar.proxy import Proxy
from tests.proto.backend import Backend
from tests.proto.conftest import (
    Conn,
    MakeProxy,
    RecordingHooks,
    port,
    raw,
    request,
    sample,
    until,
    upstream,
)


@contextlib.asynccontextmanager
async def canned_upstream(answer: bytes) -> AsyncIterator[int]:
    """An upstream that answers every request head with the same bytes, keeping the connection.

    It reads heads only (the probes here send no request bodies), so a response can
    carry framing the proxy must not mangle, byte for byte.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        writer.close()

    async with upstream(serve) as port_:
        yield port_


# ---------------------------------------------------------------- Connection vs framing


@pytest.mark.parametrize("framing", ["content-length", "transfer-encoding"])
async def test_connection_header_cannot_strip_request_framing(
    proxy: Proxy, backend: Backend, framing: str
) -> None:
    """``Connection: content-length`` must not make the body a second, unseen request.

    Dropping the named framing header while forwarding the body unchanged let the
    body reach the upstream as a request of its own, with a color the proxy never
    chose (request smuggling past the coloring).
    """
    host = f"127.0.0.1:{backend.port}"
    smuggled = f"GET /smuggled HTTP/1.1\r\nHost: {host}\r\nx-traffic-color: canary\r\n\r\n"
    if framing == "content-length":
        body = smuggled.encode()
        framed = f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    else:
        body = smuggled.encode()
        framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = f"POST /upload HTTP/1.1\r\nHost: {host}\r\nConnection: {framing}\r\n".encode()
    conn = await Conn.open(port(proxy))
    await conn.send(head + framed)
    resp = await conn.response("POST")
    assert resp.status == 200
    assert json.loads(resp.body)["body_len"] == len(body)
    # The same connection keeps working, and the upstream saw exactly what was sent.
    await conn.send(request("GET", "/next", host))
    assert json.loads((await conn.response()).body)["target"] == "/next"
    conn.close()
    assert backend.paths() == ["/upload", "/next"]
    assert backend.requests[0].body == body
    assert backend.requests[0].header("x-traffic-color") == ["stable"]


async def test_connection_header_cannot_strip_response_framing(proxy: Proxy) -> None:
    """An upstream naming Content-Length in Connection still gets its body delimited."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: content-length, x-hop\r\nx-hop: 1\r\n"
    answer += b"Content-Length: 2\r\n\r\nok"
    async with canned_upstream(answer) as up:
        conn = await Conn.open(port(proxy))
        for _ in range(2):  # the client connection stays in step
            await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
            resp = await conn.response(timeout=2)
            assert resp.status == 200 and resp.body == b"ok"
            assert resp.getheader("content-length") == "2"
            assert resp.getheader("x-hop") is None  # the other named header still goes
        conn.close()


# ---------------------------------------------------------------- forwarding loops


@pytest.mark.parametrize("name", ["localhost", "[::ffff:127.0.0.1]"])
async def test_other_names_of_the_proxy_itself_are_a_loop(proxy: Proxy, name: str) -> None:
    """Any name that reaches the outbound listener is a 508, not a chain of proxies.

    Only the literal listening address was recognised: ``localhost`` or an IPv4-mapped
    address made the proxy connect to itself again and again until it ran out of
    file descriptors, and the client never got an answer.
    """
    own = f"{name}:{port(proxy)}"
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/", own))
    resp = await conn.response(timeout=2)
    conn.close()
    assert resp.status == 508
    assert b"proxy itself" in resp.body
    assert len(proxy._shared.conns) <= 1  # type: ignore[union-attr]  # no chain of hops
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="stable", code="508"
        )
        == 1
    )


# ---------------------------------------------------------------- trailers


async def test_oversized_request_trailers_are_refused(proxy: Proxy, backend: Backend) -> None:
    """Trailers are bounded like the head: a client cannot grow one header without limit.

    The head limit stopped at the end of the head, so a chunked body followed by a
    trailer field of unbounded length was buffered whole (and re-copied on every read).
    """
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    await conn.send(
        f"POST /t HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5;ext=1\r\nhello\r\n0\r\nX-Trailer: ".encode()
    )
    answer = asyncio.create_task(conn.response("POST"))
    with contextlib.suppress(ConnectionError):
        for _ in range(1024):  # up to 1 MiB of one trailer value, in bounded writes
            if answer.done():
                break
            await conn.send(b"v" * 1024)
    # The refusal may race the client's own writes (the proxy closes with unread bytes,
    # which the kernel turns into a reset); either way nothing was accepted.
    try:
        resp = await answer
    except (ConnectionError, EOFError):
        resp = None
    conn.close()
    if resp is not None:
        assert resp.status == 431
        assert resp.getheader("connection") == "close"
    assert backend.requests == []  # the upstream never got a complete request
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="stable", code="431"
        )
        == 1
    )


async def test_small_trailers_and_chunk_extensions_still_pass(
    proxy: Proxy, backend: Backend
) -> None:
    """The trailer bound does not refuse ordinary chunked uploads with trailers."""
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    chunks = b"".join(b"%x;n=%d\r\n%s\r\n" % (100, i, b"z" * 100) for i in range(2000))
    await conn.send(
        f"POST /t HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + chunks
        + b"0\r\nX-Checksum: abc\r\n\r\n"
    )
    resp = await conn.response("POST")
    conn.close()
    assert resp.status == 200
    assert backend.requests[-1].body == b"z" * 200_000


# ---------------------------------------------------------------- refused heads stay here


@pytest.mark.parametrize("te", ["gzip", "identity", "chunked, gzip"])
async def test_unframed_request_never_reaches_a_pooled_upstream(
    proxy: Proxy, backend: Backend, te: str
) -> None:
    """A request whose Transfer-Encoding does not end in chunked is a 400, sent nowhere.

    llhttp refuses it only after the head is complete, and by then the head had
    already gone out on a warm pooled connection: the upstream could act on a
    request the client was told was refused.
    """
    host = f"127.0.0.1:{backend.port}"
    warm = await Conn.open(port(proxy))
    await warm.send(request("GET", "/warm", host))
    assert (await warm.response()).status == 200  # leaves an idle pooled connection
    warm.close()
    conn = await Conn.open(port(proxy))
    await conn.send(
        f"POST /pay HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {te}\r\n\r\nabc".encode()
    )
    resp = await conn.response("POST")
    assert resp.status == 400
    assert resp.getheader("connection") == "close"
    assert await conn.closed()
    conn.close()
    await asyncio.sleep(0.1)  # give a wrongly forwarded head time to arrive
    assert backend.paths() == ["/warm"]


@pytest.mark.parametrize("value", ["a b", "a\tb", "[::1", "ex{ample}.com"])
async def test_invalid_host_is_the_clients_error(proxy: Proxy, value: str) -> None:
    """A Host that is not an authority is a 400 (RFC 9112 section 3.2), not a 502.

    It was passed to the resolver, and the client was told the upstream could not
    be reached.
    """
    conn = await Conn.open(port(proxy))
    await conn.send(f"GET / HTTP/1.1\r\nHost: {value}\r\n\r\n".encode())
    resp = await conn.response()
    conn.close()
    assert resp.status == 400


# ---------------------------------------------------------------- response framing


async def test_close_delimited_response_keeps_its_transfer_coding(proxy: Proxy) -> None:
    """``Transfer-Encoding: gzip`` without chunked (close-delimited) keeps the coding.

    The proxy re-chunks such a body for an HTTP/1.1 client; it used to replace the
    header with plain ``chunked``, so the client took gzip bytes for the content.
    """
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZ-BYTES"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    try:
        out = await raw(port(proxy), request("GET", "/", f"127.0.0.1:{up}"), half_close=True)
    finally:
        server.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    codings = [
        line.split(b":", 1)[1].strip().lower()
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"transfer-encoding:")
    ]
    assert codings == [b"gzip, chunked"]
    assert body == b"8\r\nGZ-BYTES\r\n0\r\n\r\n"


# ---------------------------------------------------------------- upstreams that hang up at once


class _ResetOnAccept(asyncio.Protocol):
    """An upstream at its connection limit: it accepts, then resets at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # type: ignore[attr-defined]


@pytest.mark.parametrize("colored", [False, True], ids=["plain", "with-flow-hooks"])
async def test_upstream_resetting_a_fresh_connection_is_502_not_a_hang(
    make_proxy: MakeProxy, colored: bool
) -> None:
    """A new connection reset before the proxy used it answers 502 at once.

    Writing the request to the already-closed transport raised inside a loop
    callback, and the client waited for ever: a busy request has no timeout.
    """
    hooks = RecordingHooks() if colored else None
    proxy = await make_proxy(hooks=hooks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_ResetOnAccept, "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    try:
        conn = await Conn.open(port(proxy))
        for _ in range(3):  # and the client connection stays usable
            await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
            resp = await conn.response(timeout=2)
            assert resp.status == 502
            assert f"127.0.0.1:{up}".encode() in resp.body
        conn.close()
    finally:
        server.close()
    if hooks is not None:  # every flow the kernel heard of was also closed
        assert await until(lambda: sorted(hooks.closed) == sorted(hooks.opened))


# ---------------------------------------------------------------- inbound Host


async def test_inbound_http11_request_without_host_is_refused(
    proxy: Proxy, backend: Backend
) -> None:
    """RFC 9112 section 3.2: an HTTP/1.1 request without Host is a 400, on both sides.

    The inbound side made one up from the app's address and passed the request on.
    HTTP/1.0 has no Host requirement: it is still forwarded, with one added.
    """
    inbound = port(proxy, "inbound")
    conn = await Conn.open(inbound)
    await conn.send(b"GET /no-host HTTP/1.1\r\n\r\n")
    resp = await conn.response()
    assert resp.status == 400
    assert await conn.closed()
    conn.close()
    assert backend.requests == []
    out = await raw(inbound, b"GET /old HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert backend.requests[-1].header("host") == [f"127.0.0.1:{backend.port}"]


# ---------------------------------------------------------------- failed tunnels


@pytest.mark.parametrize("kind", ["connect", "upgrade"])
async def test_failed_tunnel_request_closes_instead_of_hanging(proxy: Proxy, kind: str) -> None:
    """A CONNECT or Upgrade whose upstream is down gets a 502 that closes the connection.

    The 502 said ``keep-alive``, but the parser had already switched to tunnel mode:
    the client's next request on that connection was never answered.
    """
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    if kind == "connect":
        first = f"CONNECT {dead} HTTP/1.1\r\nHost: {dead}\r\n\r\n".encode()
    else:
        first = request("GET", "/ws", dead, {"Connection": "Upgrade", "Upgrade": "websocket"})
    conn = await Conn.open(port(proxy))
    await conn.send(first)
    resp = await conn.response("CONNECT" if kind == "connect" else "GET")
    assert resp.status == 502
    assert resp.getheader("connection") == "close"
    assert await conn.closed()
    conn.close()


# ---------------------------------------------------------------- client half-close mid-request


@pytest.mark.parametrize(
    "partial",
    [
        "POST /x HTTP/1.1\r\nHost: {h}\r\nContent-Length: 10\r\n\r\nabc",
        "POST /x HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        "GET /x HTTP/1.1\r\nHost: {h}\r\nX-A",
    ],
    ids=["content-length-body", "chunked-body", "head"],
)
async def test_half_close_mid_request_is_answered_at_once(
    proxy: Proxy, backend: Backend, partial: str
) -> None:
    """A client that shuts down its side before its request is complete gets a 400 now.

    The request can never complete, yet the proxy waited for the header or idle
    timeout (then answered 408), holding the upstream connection meanwhile.
    """
    data = partial.replace("{h}", f"127.0.0.1:{backend.port}").encode()
    out = await raw(port(proxy), data, half_close=True)
    assert out.startswith(b"HTTP/1.1 400 "), out[:100]
    assert b"connection: close" in out.lower()
    assert backend.requests == []
    assert await until(lambda: proxy.open_flows() == {})


async def test_half_close_mid_pipelined_request_answers_the_complete_ones(
    proxy: Proxy, backend: Backend
) -> None:
    """Requests ahead of the unfinished one are still answered, in order, then the 400."""
    host = f"127.0.0.1:{backend.port}"
    data = (
        request("GET", "/hold?s=0.1", host) + request("GET", "/b", host) + b"GET /c HTTP/1.1\r\nHo"
    )
    out = await raw(port(proxy), data, half_close=True)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"200", b"400"]
    assert backend.paths() == ["/hold?s=0.1", "/b"]


# ---------------------------------------------------------------- upstream sending too much


async def test_bytes_after_a_complete_response_never_answer_the_next_request(
    proxy: Proxy,
) -> None:
    """An upstream that sends a second response unasked cannot answer a pipelined request.

    The connection went back to the pool, and was handed to the next pipelined request,
    while llhttp was still parsing the rest of the same read: the unasked response
    became the answer to a request the upstream had not even received yet.
    """
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    answer += b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstale!"
    async with canned_upstream(answer) as up:
        host = f"127.0.0.1:{up}"
        conn = await Conn.open(port(proxy))
        await conn.send(request("GET", "/a", host) + request("GET", "/b", host))
        bodies = [(await conn.response()).body for _ in range(2)]
        conn.close()
    assert bodies == [b"ok", b"ok"]


async def test_response_head_in_pieces_after_an_interim_one_arrives_whole(proxy: Proxy) -> None:
    """A final head that starts in the read carrying a 103 and ends reads later keeps
    every header, loses its hop-by-hop ones, and the next exchange starts clean."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            for n in range(2):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(  # one write: one read at the proxy
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConn"
                )
                for piece in (b"ection: keep-alive\r\nKeep-Al", b"ive: timeout=5\r\nX-B: %d\r" % n):
                    await writer.drain()
                    await asyncio.sleep(0.05)  # separate reads at the proxy
                    writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"\nContent-Length: 2\r\n\r\nok")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    try:
        conn = await Conn.open(port(proxy))
        for n in range(2):
            await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
            early = await conn.response(timeout=2)
            assert early.status == 103 and early.getheader("link") == "</a.css>"
            resp = await conn.response(timeout=2)
            assert resp.status == 200 and resp.body == b"ok"
            assert (resp.getheader("x-a"), resp.getheader("x-b")) == ("1", str(n))
            assert resp.getheader("keep-alive") is None
        conn.close()
    finally:
        server.close()


async def test_endless_response_head_is_cut_off(proxy: Proxy) -> None:
    """A response head is bounded like a request head: 502, not unbounded buffering.

    The outbound side talks to any host an app names; one that sent a header without
    end had all of it buffered (and re-copied on every read) until it stopped.
    """
    sent = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(256):  # at most 16 MiB
                writer.write(b"v" * 65536)
                await writer.drain()
                sent += 65536
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    try:
        conn = await Conn.open(port(proxy))
        await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
        resp = await conn.response(timeout=10)
        conn.close()
    finally:
        server.close()
    assert resp.status == 502
    assert b"larger than 64 KiB" in resp.body
    assert sent < 16 << 20  # the proxy hung up instead of reading it all


async def test_connect_to_the_proxy_itself_is_a_loop(proxy: Proxy) -> None:
    """CONNECT to another name of the outbound listener is refused the same way."""
    own = f"localhost:{port(proxy)}"
    conn = await Conn.open(port(proxy))
    await conn.send(f"CONNECT {own} HTTP/1.1\r\nHost: {own}\r\n\r\n".encode())
    resp = await conn.response("CONNECT")
    assert resp.status == 508
    assert await conn.closed()
    conn.close()


class _Flow:
    def __init__(self, local: str, peer: str, peer_port: int) -> None:
        self.addrs = ((local, 40000), (peer, peer_port))


def test_loop_check_on_wildcard_listeners(proxy: Proxy) -> None:
    """A wildcard listener is reached through any local address; remote hosts are not it."""
    shared = proxy._shared
    assert shared is not None
    shared.listening = [("0.0.0.0", 15001), ("::", 15001)]
    assert shared.loops_back(_Flow("10.1.2.3", "10.1.2.3", 15001))  # the pod's own IP
    assert shared.loops_back(_Flow("::ffff:127.0.0.1", "::ffff:127.0.0.1", 15001))
    assert shared.loops_back(_Flow("fd00::5", "fd00::5", 15001))
    assert not shared.loops_back(_Flow("10.1.2.3", "10.9.9.9", 15001))  # another host
    assert not shared.loops_back(_Flow("10.1.2.3", "10.1.2.3", 8080))  # another port
    shared.listening = [("127.0.0.1", 15001)]
    assert shared.loops_back(_Flow("127.0.0.1", "127.0.0.1", 15001))
    assert shared.loops_back(_Flow("::ffff:127.0.0.1", "::ffff:127.0.0.1", 15001))
    assert not shared.loops_back(_Flow("10.1.2.3", "10.1.2.3", 15001))  # not listening there
