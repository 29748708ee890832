"""A small real HTTP/1.1 backend for the proxy's tests, on asyncio streams.

It parses requests by hand (not with httptools, so a parser misuse in the proxy
cannot hide behind the same parser here), records everything it received, and
answers according to the path:

- any path: 200 with a JSON echo of method, target, version, headers and body length
- ``/status/NNN``: that status (no body for 1xx/204/304)
- ``/hints``: a 103 Early Hints, then the echo
- ``/chunked?n=K``: the echo split into K chunks, chunked
- ``/close-delimited``: no Content-Length; the body ends when the connection closes
- ``/die``: announces 1000 bytes, sends 10, closes;  ``/die-chunked``: one chunk, closes
- ``/die-head``: closes after a partial status line
- ``/hold?s=X``: answers after X seconds
- ``/big?n=N``: N bytes of body
- ``/arm-drop``: answers, then closes the connection on its next request without answering
- ``Expect: 100-continue``: sends 100 Continue before reading the body (``/refuse`` answers
  417 without reading it)
- ``Upgrade`` requests: 101, then echoes bytes back upper-cased until EOF
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple[str, int]
    answered: bool = True

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class Backend:
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    def paths(self) -> list[str]:
        return [s.target for s in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = writer.get_extra_info("peername")[:2]
        self.peers.append(peer)
        self.writers.add(writer)
        drop_next = False
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
                headers: list[tuple[str, str]] = []
                while True:
                    h = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
                    if not h:
                        break
                    name, _, value = h.partition(":")
                    headers.append((name, value.strip()))
                seen = Seen(method, target, version, headers, b"", peer)
                if drop_next:
                    seen.answered = False
                    self.requests.append(seen)
                    return  # close without answering: a keep-alive race, on purpose
                path = urlsplit(target).path
                if seen.header("upgrade"):
                    self.requests.append(seen)
                    await self._upgrade(reader, writer)
                    return
                if seen.header("expect") and seen.header("expect")[0].lower() == "100-continue":
                    if path == "/refuse":
                        self.requests.append(seen)
                        writer.write(
                            b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\n"
                            b"connection: close\r\n\r\n"
                        )
                        await writer.drain()
                        return
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                seen.body = await self._read_body(reader, seen)
                self.requests.append(seen)
                if path == "/arm-drop":
                    drop_next = True
                if not await self._answer(writer, seen, path, urlsplit(target).query):
                    return
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, seen: Seen) -> bytes:
        te = ",".join(seen.header("transfer-encoding")).lower()
        if "chunked" in te:
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return body
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        cl = seen.header("content-length")
        return await reader.readexactly(int(cl[0])) if cl else b""

    def _echo(self, seen: Seen) -> bytes:
        return json.dumps(
            {
                "method": seen.method,
                "target": seen.target,
                "version": seen.version,
                "headers": seen.headers,
                "body_len": len(seen.body),
            }
        ).encode()

    async def _answer(
        self, writer: asyncio.StreamWriter, seen: Seen, path: str, query: str
    ) -> bool:
        """Write the answer; False when the connection must end."""
        q = {k: v[0] for k, v in parse_qs(query).items()}
        head_only = seen.method == "HEAD"
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            if code in (204, 304) or code < 200:
                writer.write(b"HTTP/1.1 %d X\r\nx-backend: 1\r\n\r\n" % code)
            else:
                body = b"status %d\n" % code
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s"
                    % (code, len(body), b"" if head_only else body)
                )
            await writer.drain()
            return True
        if path == "/hold":
            await asyncio.sleep(float(q.get("s", "1")))
        if path == "/die-head":
            writer.write(b"HTTP/1.1 20")
            await writer.drain()
            return False
        if path == "/die":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            await writer.drain()
            return False
        if path == "/die-chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            return False
        body = b"x" * int(q["n"]) if path == "/big" else self._echo(seen)
        if path == "/hints":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n")
        if path == "/close-delimited":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
            if not head_only:
                writer.write(body)
            await writer.drain()
            return False
        if path == "/chunked":
            n = int(q.get("n", "3"))
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                b"x-hop: gone\r\nconnection: x-hop\r\n\r\n"
            )
            if not head_only:
                step = max(1, len(body) // n + 1)
                for i in range(0, len(body), step):
                    part = body[i : i + step]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"keep-alive: timeout=5\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        if not head_only:
            writer.write(body)
        await writer.drain()
        return True

    async def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        )
        await writer.drain()
        while True:
            data = await reader.read(65536)
            if not data:
                writer.write_eof()
                await writer.drain()
                return
            writer.write(data.upper())
            await writer.drain()
