"""Graceful stop with ``drain_accept``, in process, on loopback, with raw sockets.

The race a rollout hits: an answer whose head left before the drain began
(promising keep-alive) and whose body came after. The client reuses the
connection at once; it must get an answer (saying ``Connection: close``), not a
closed socket. New connections are served during the accept period and
refused after it; ``/readyz`` fails from the start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.runtime.test_runtime import admin_get, configmap, policy_text, started

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


async def split_upstream() -> tuple[asyncio.AbstractServer, int]:
    """Answers each request with its head at once and its body 0.4 s later."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(HEAD)
                await writer.drain()
                await asyncio.sleep(0.4)
                writer.write(b"ok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
    return head.lower()


async def test_keep_alive_promised_before_the_drain_is_kept(tmp_path: Path) -> None:
    server, port = await split_upstream()
    text = policy_text(port).replace(
        "timeouts: {drain: 2}", "timeouts: {drain_accept: 1.5, drain: 2}"
    )
    sc = await started(configmap(tmp_path, text))
    host, inbound = sc.proxy.addresses["inbound"]
    stopping = None
    try:
        reader, writer = await asyncio.open_connection(host, inbound)
        writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"connection: close" not in head.lower()
        stopping = asyncio.ensure_future(sc.stop())  # the body is still on its way
        await asyncio.sleep(0.05)
        assert (await admin_get(sc, "/readyz"))[0] == 503
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        # Reused at once, as a keep-alive client does: answered, and told to move on.
        assert b"connection: close" in await exchange(reader, writer)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # A new connection during the accept period is served the same way.
        reader, writer = await asyncio.open_connection(host, inbound)
        assert b"connection: close" in await exchange(reader, writer)
        writer.close()
        await asyncio.sleep(1.0)  # past drain_accept (1.5 s from the start)
        try:
            await asyncio.open_connection(host, inbound)
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("still accepting after drain_accept")
        await asyncio.wait_for(stopping, 10)
    finally:
        if stopping is None:
            await sc.stop()
        server.close()
