"""Helpers of the HTTP/2 tests: a real grpcio server and client (bytes in, bytes out, no
generated code), an ``nghttpd`` backend, and raw HTTP/2 frames built by hand."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE = "t.T"
MAX_MESSAGE = 16 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def _ident(b: bytes) -> bytes:
    return b


class GrpcBackend:
    """A grpcio server whose handlers say what they saw: the color of each call, and
    which calls ended by cancellation (a deadline or a client's cancel, passed on as
    RST_STREAM by the proxy)."""

    def __init__(self) -> None:
        self.colors: list[tuple[str, str]] = []  # (method, x-traffic-color), per call
        self.cancelled: list[str] = []
        self.active = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=_OPTIONS)
        u = grpc.unary_unary_rpc_method_handler
        handlers = {
            "Unary": u(self._unary, _ident, _ident),
            "Echo": u(self._echo, _ident, _ident),
            "Slow": u(self._slow, _ident, _ident),
            "Fail": u(self._fail, _ident, _ident),
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                self._server_stream, _ident, _ident
            ),
            "ClientStream": grpc.stream_unary_rpc_method_handler(
                self._client_stream, _ident, _ident
            ),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi, _ident, _ident),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)

    def _seen(self, method: str, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata())
        color = md.get("x-traffic-color", "")
        with self._lock:
            self.colors.append((method, color))
        return color

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._seen("Unary", context).encode() + b"|" + request

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen("Echo", context)
        return request

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen("Slow", context)
        with self._lock:
            self.active += 1
        try:
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not context.is_active():
                with self._lock:
                    self.cancelled.append(request.decode(errors="replace"))
            return b"late"
        finally:
            with self._lock:
                self.active -= 1

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen("Fail", context)
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen("ServerStream", context)
        n, size = (int(x) for x in request.split(b","))
        for i in range(n):
            yield i.to_bytes(4, "big") * (size // 4)

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._seen("ClientStream", context)
        total = count = 0
        for r in requests:
            total += len(r)
            count += 1
        return f"{count},{total}".encode()

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen("Bidi", context)
        for r in requests:
            yield r[::-1]


def channel(port: int, authority: str | None = None) -> grpc.Channel:
    """A client channel to ``port``; ``authority`` is what it names (outbound: the upstream)."""
    options = list(_OPTIONS)
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def call(ch: grpc.Channel, method: str, kind: str = "unary_unary") -> Any:
    return getattr(ch, kind)(f"/{SERVICE}/{method}", _ident, _ident)


async def in_thread(fn: Any, *args: Any, **kw: Any) -> Any:
    """Blocking grpcio calls run in a thread, so the proxy's loop keeps running."""
    return await asyncio.to_thread(fn, *args, **kw)


# ---------------------------------------------------------------- nghttpd


class Nghttpd:
    """Debian's ``nghttpd --no-tls`` serving files of given sizes from a temporary root."""

    def __init__(self, files: dict[str, int]) -> None:
        if shutil.which("nghttpd") is None:
            raise RuntimeError("nghttpd missing: apt-get install nghttp2-server (make install)")
        self.root = tempfile.TemporaryDirectory(prefix="h2-www-")
        for name, size in files.items():
            Path(self.root.name, name).write_bytes(bytes(i % 251 for i in range(size)))
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["nghttpd", "--no-tls", "-d", self.root.name, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.close()
        raise RuntimeError("nghttpd did not start")

    def body(self, name: str) -> bytes:
        return Path(self.root.name, name).read_bytes()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.root.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- raw frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
PROTOCOL_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x1, 0x9, 0xB


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", sid)
        + payload
    )


def _int(value: int, prefix: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1)."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack(fields: list[tuple[bytes, bytes]]) -> bytes:
    """Literal fields without indexing, new names, no Huffman: every decoder reads them."""
    out = b""
    for name, value in fields:
        out += b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value
    return out


def request_fields(authority: str, path: str = "/", extra: list | None = None) -> list:
    fields = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
    ]
    return fields + [(k.encode(), v.encode()) for k, v in (extra or [])]


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in ``data``."""
    return split_frames(data)[0]


def split_frames(data: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """The whole frames in ``data`` and the bytes after them."""
    out = []
    at = 0
    while len(data) - at >= 9:
        n = int.from_bytes(data[at : at + 3], "big")
        if len(data) - at < 9 + n:
            break
        kind, flags = data[at + 3], data[at + 4]
        sid = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, sid, data[at + 9 : at + 9 + n]))
        at += 9 + n
    return out, data[at:]


class RawH2:
    """A hand-driven HTTP/2 client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames: list[tuple[int, int, int, bytes]] = []  # every frame read so far
        self.buf = b""

    @classmethod
    async def open(cls, port: int, settings: bytes = b"") -> RawH2:
        conn = cls(*await asyncio.open_connection("127.0.0.1", port))
        conn.writer.write(PREFACE + frame(SETTINGS, 0, 0, settings))
        return conn

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read(self) -> bool:
        try:
            chunk = await self.reader.read(262144)
        except ConnectionError:
            chunk = b""
        if not chunk:
            return False
        frames, self.buf = split_frames(self.buf + chunk)
        self.frames += frames
        return True

    async def read_until_closed(self, timeout: float = 5.0) -> list[tuple[int, int, int, bytes]]:
        """Every frame the proxy sent until it closed the connection (fails on timeout)."""
        async with asyncio.timeout(timeout):
            while await self._read():
                pass
        return self.frames

    async def frames_until(self, want: Any, timeout: float = 5.0) -> list:
        """Read until ``want(frames)`` is true, or the connection closes; returns the frames."""
        async with asyncio.timeout(timeout):
            while not want(self.frames) and await self._read():
                pass
        return self.frames

    def close(self) -> None:
        self.writer.close()


def goaway_code(frames: list) -> int | None:
    for kind, _, _, payload in frames:
        if kind == GOAWAY:
            return int.from_bytes(payload[4:8], "big")
    return None


class RawUpstream:
    """A hand-driven HTTP/2 server for what no stock server does on demand: a GOAWAY that
    leaves streams unprocessed, a small SETTINGS_MAX_CONCURRENT_STREAMS, slow answers.

    The first ``goaways`` connections answer their first request with a GOAWAY naming no
    stream as processed; later ones answer each request ``:status 200`` after ``delay``
    seconds (or, with ``reset``, a head, some DATA and RST_STREAM).
    """

    def __init__(
        self,
        max_streams: int | None = None,
        delay: float = 0.0,
        goaways: int = 0,
        reset: int | None = None,
    ) -> None:
        self.max_streams, self.delay, self.goaways = max_streams, delay, goaways
        self.reset = reset  # answer with a head, then RST_STREAM with this code
        self.connections = 0
        self.requests: list[tuple[int, int]] = []  # (connection, stream id) answered
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        settings = b"" if self.max_streams is None else struct.pack(">HI", 3, self.max_streams)
        writer.write(frame(SETTINGS, 0, 0, settings))
        buf = b""
        try:
            await reader.readexactly(len(PREFACE))
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                frames, buf = split_frames(buf + chunk)
                for kind, flags, sid, _ in frames:
                    if kind == SETTINGS and not flags & ACK:
                        writer.write(frame(SETTINGS, ACK, 0))
                    elif kind == HEADERS and index < self.goaways:
                        writer.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
                        await writer.drain()
                        writer.close()
                        return
                    elif kind == HEADERS:
                        asyncio.get_running_loop().call_later(
                            self.delay, self._answer, writer, index, sid
                        )
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def _answer(self, writer: asyncio.StreamWriter, index: int, sid: int) -> None:
        if writer.is_closing():
            return
        self.requests.append((index, sid))
        if self.reset is not None:
            writer.write(frame(HEADERS, END_HEADERS, sid, b"\x88"))
            writer.write(frame(DATA, 0, sid, b"partial"))
            writer.write(frame(RST_STREAM, 0, sid, struct.pack(">I", self.reset)))
            return
        writer.write(frame(HEADERS, END_STREAM | END_HEADERS, sid, b"\x88"))  # :status 200
