"""Fixtures of the proxy tests: uvloop, a real backend, proxies on 127.0.0.1:0, raw clients."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from http.client import HTTPResponse
from typing import Any

import pytest
import uvloop

from sidecar.admin.metrics import ProxyMetrics
from sidecar.coloring import Colorer
from sidecar.policy import Address, Timeouts, default_policy, parse_policy
from sidecar.proxy import Proxy, ProxyContext
from tests.proto.backend import Backend

FAST = Timeouts(header_read=5.0, idle=5.0, connect=2.0, upstream_idle=5.0, drain=2.0)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """The proxy runs on uvloop in production, so its tests do too."""
    return {"uvloop": uvloop.new_event_loop}


class RecordingHooks:
    """FlowHooks that remember every call, as the kernel data path would see them."""

    def __init__(self, fail: bool = False) -> None:
        self.opened: list[tuple[str, tuple[str, int], tuple[str, int]]] = []
        self.closed: list[tuple[str, tuple[str, int], tuple[str, int]]] = []
        self.fail = fail

    def flow_open(self, color: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
        self.opened.append((color, local, remote))
        if self.fail:
            raise RuntimeError("map full")

    def flow_close(self, color: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
        self.closed.append((color, local, remote))
        if self.fail:
            raise RuntimeError("map gone")


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = await Backend().start()
    yield b
    await b.close()


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(backend: Backend) -> AsyncIterator[MakeProxy]:
    made: list[Proxy] = []

    async def make(
        *,
        policy: str | None = None,
        color: str = "stable",
        timeouts: Timeouts = FAST,
        hooks: RecordingHooks | None = None,
        app: Address | None = None,
    ) -> Proxy:
        pol = parse_policy(policy, "test.yaml") if policy else default_policy()
        ctx = ProxyContext(
            colorer=Colorer(pol, color),
            metrics=ProxyMetrics(),
            timeouts=timeouts,
            app=app or Address("127.0.0.1", backend.port),
            hooks=hooks,
        )
        proxy = Proxy(ctx)
        await proxy.start(Address("127.0.0.1", 0), Address("127.0.0.1", 0))
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.drain(0.5)


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy()


def port(proxy: Proxy, side: str = "outbound") -> int:
    return proxy.addresses[side][1]


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.ctx.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# ---------------------------------------------------------------- raw clients


async def raw(port_: int, data: bytes, *, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Send bytes, read until the server closes (or the timeout): all it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


class Conn:
    """A raw client connection that reads whole responses with the stdlib's parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""

    @classmethod
    async def open(cls, port_: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port_))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "GET", timeout: float = 5.0) -> Any:
        """Read one response (head and body, by its framing)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            parsed = _parse_one(self.buf, method)
            if parsed is not None:
                resp, used = parsed
                self.buf = self.buf[used:]
                return resp
            left = deadline - asyncio.get_running_loop().time()
            chunk = await asyncio.wait_for(self.reader.read(65536), max(left, 0.01))
            if not chunk:
                raise EOFError(f"closed after {self.buf[:300]!r}")
            self.buf += chunk

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the proxy closed the connection (EOF), False on timeout."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        self.buf += rest
        return True

    def close(self) -> None:
        self.writer.close()


class _KeepOpen(io.BytesIO):
    def close(self) -> None:  # HTTPResponse closes its file after a body; keep the position
        pass


class _Sock:
    def __init__(self, data: bytes) -> None:
        self.file = _KeepOpen(data)

    def makefile(self, *_: object, **__: object) -> io.BytesIO:
        return self.file


class _Interim:
    """A 1xx head, which http.client swallows; the tests want to see it."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = dict(
            (n.strip().lower(), v.strip()) for n, _, v in (h.partition(":") for h in lines[1:] if h)
        )
        self.body = b""

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


def _parse_one(data: bytes, method: str) -> tuple[Any, int] | None:
    """One complete response from ``data`` with http.client, or None if more bytes are needed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line = data[: data.find(b"\r\n")].split(b" ", 2)
    if status_line[1][:1] == b"1" and status_line[1] != b"101":
        return _Interim(data[: end + 4]), end + 4  # http.client would skip 1xx heads
    sock = _Sock(data)
    resp = HTTPResponse(sock, method=method)  # type: ignore[arg-type]
    try:
        resp.begin()
        if resp.status < 200 and resp.status != 101:
            resp.body = b""  # type: ignore[attr-defined]
            return resp, sock.file.tell()
        if resp.status == 101 or (method == "CONNECT" and resp.status == 200):
            resp.body = b""  # type: ignore[attr-defined]
            return resp, sock.file.tell()
        if (
            resp.length is None
            and not resp.chunked
            and method != "HEAD"
            and resp.status
            not in (
                204,
                304,
            )
        ):
            return None  # close-delimited: only complete at EOF
        resp.body = resp.read()  # type: ignore[attr-defined]
    except Exception:
        return None
    return resp, sock.file.tell()


def request(
    method: str, target: str, host: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---------------------------------------------------------------- curl


async def curl(*args: str, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (apt-get install curl; make install does it)")
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        str(timeout),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "NO_PROXY": "", "no_proxy": ""},
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Wait for a condition the event loop makes true (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def upstream(serve: Serve) -> AsyncIterator[int]:
    """A loopback upstream that runs ``serve`` for each connection; yields its port."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def stuck_listener() -> AsyncIterator[int]:
    """A port whose accept queue is full, so new connects hang (for connect timeouts)."""
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port_ = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port_))
        fillers.append(s)
    await asyncio.sleep(0.1)
    try:
        yield port_
    finally:
        for s in fillers:
            s.close()
        lsock.close()
