"""The front door on loopback: protocol hand-off, the opaque relay, and captured HTTP/1.

No nftables here: ``original_destination`` is replaced by a stub that says where a
"redirected" connection was going, which is all capture adds to an accepted socket
(the kernel side is tested in tests/e2e/test_capture.py). Clients and servers are
real sockets.
"""

from __future__ import annotations

import asyncio
import json
import sys
import types

import pytest

from sidecar.policy import Capture
from sidecar.proxy import listener
from sidecar.proxy.listener import PREFACE
from tests.proto.backend import Backend
from tests.proto.conftest import Conn, MakeProxy, RecordingHooks, port, request, until, upstream


def _capture(monkeypatch: pytest.MonkeyPatch, proxy, dst: tuple[str, int], **kw) -> None:
    """Make the proxy believe every accepted connection was redirected from ``dst``."""
    proxy.ctx.capture = Capture(enabled=True, **kw)
    monkeypatch.setattr(listener, "original_destination", lambda sock: dst)


def _count(proxy, direction: str, protocol: str) -> int:
    return proxy.ctx.metrics.direction(direction).connections[protocol]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()  # half-close passed back only once the client's has arrived
    await asyncio.sleep(0.2)
    writer.close()


async def test_captured_http1_goes_to_the_original_destination_with_host_untouched(
    make_proxy: MakeProxy, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await make_proxy()
    _capture(monkeypatch, proxy, ("127.0.0.1", backend.port))
    conn = await Conn.open(port(proxy))
    # The Host names a service the proxy could not resolve: only the destination counts.
    await conn.send(request("GET", "/x", "orders.shop.svc.cluster.local"))
    resp = await conn.response()
    assert resp.status == 200
    seen = backend.requests[-1]
    assert seen.header("host") == ["orders.shop.svc.cluster.local"]
    assert seen.header("x-traffic-color") == ["stable"]
    assert _count(proxy, "outbound", "http1") == 1
    conn.close()


async def test_captured_inbound_reaches_the_app_on_the_port_dialled(
    make_proxy: MakeProxy, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.policy import Address

    # ctx.app names another port: the dialled one (the backend's) must win.
    proxy = await make_proxy(app=Address("127.0.0.1", 9))
    _capture(monkeypatch, proxy, ("198.18.1.2", backend.port))
    conn = await Conn.open(port(proxy, "inbound"))
    await conn.send(request("GET", "/in", "pod.example", {"x-traffic-color": "canary"}))
    resp = await conn.response()
    assert resp.status == 200, resp.body
    assert backend.requests[-1].header("x-traffic-color") == ["canary"]
    assert _count(proxy, "inbound", "http1") == 1
    conn.close()


async def test_opaque_relay_is_byte_for_byte_both_ways_with_half_close_and_the_pods_color(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks, color="canary")
    payload = bytes(range(256)) * 8192  # 2 MiB: more than any socket buffer (backpressure)
    async with upstream(_echo) as up:
        _capture(monkeypatch, proxy, ("127.0.0.1", up))
        reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
        writer.write(b"\x16\x03\x01binary, not HTTP" + payload)
        await writer.drain()
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(), 10)  # ends at the echo's half-close
        writer.close()
    assert back == b"\x16\x03\x01binary, not HTTP" + payload
    assert _count(proxy, "outbound", "opaque") == 1
    moved = proxy.ctx.metrics.direction("outbound").opaque_bytes["canary"]
    assert moved == 2 * len(back)
    # One flow, of the pod's color, told to the kernel data path and closed after.
    assert [(c, r[1]) for c, _, r in hooks.opened] == [("canary", up)]
    assert await until(lambda: hooks.closed == hooks.opened)


async def test_a_server_first_port_is_relayed_at_once(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")
        await writer.drain()
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()

    proxy = await make_proxy()
    async with upstream(banner) as up:
        _capture(monkeypatch, proxy, ("127.0.0.1", up), opaque_ports=(up,), detect_timeout=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
        assert await asyncio.wait_for(reader.readline(), 2) == b"220 ready\r\n"
        writer.write(b"helo x\r\n")
        assert await asyncio.wait_for(reader.readline(), 2) == b"HELO X\r\n"
        writer.close()


async def test_a_silent_captured_client_is_relayed_after_the_detect_timeout(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello first\n")
        await writer.drain()
        await reader.read()
        writer.close()

    proxy = await make_proxy()
    async with upstream(banner) as up:
        _capture(monkeypatch, proxy, ("127.0.0.1", up), detect_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello first\n"
        writer.close()
    assert _count(proxy, "outbound", "opaque") == 1


async def test_a_relay_whose_destination_refuses_is_refused(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = await make_proxy()
    _capture(monkeypatch, proxy, ("127.0.0.1", dead))
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    writer.write(b"\x00\x01binary")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert await until(lambda: not proxy.open_flows())


async def test_plain_http2_preface_without_an_http2_side_is_refused_by_http1(
    proxy, monkeypatch
) -> None:
    """A binding that cannot be imported: the HTTP/1 path refuses what it cannot serve."""
    monkeypatch.setitem(sys.modules, "sidecar.proxy.http2", None)  # import raises
    conn = await Conn.open(port(proxy))
    await conn.send(PREFACE)
    resp = await conn.response(timeout=2)
    assert resp.status in (400, 505)
    conn.close()


async def test_plain_silent_connection_closes_at_the_header_read_timeout(
    make_proxy: MakeProxy,
) -> None:
    from sidecar.policy import Timeouts

    proxy = await make_proxy(timeouts=Timeouts(header_read=0.2, idle=5, connect=2, drain=1))
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


class _FakeH2Side:
    """Stands in for sidecar.proxy.http2.H2Side: records the hand-off, answers a fixed line."""

    made: list[_FakeH2Side] = []

    def __init__(self, ctx, loop) -> None:
        self.calls: list[tuple[str, tuple[str, int] | None]] = []
        self.got = b""
        _FakeH2Side.made.append(self)

    def protocol(self, direction: str, dst):
        side = self
        side.calls.append((direction, dst))

        class P(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                side.got += data
                self.transport.write(json.dumps([direction, dst]).encode() + b"\n")

        return P()

    async def drain(self, timeout: float) -> None:
        self.drained = timeout

    def open_flows(self) -> dict[str, int]:
        return {"stable": 1}


async def test_the_http2_preface_is_handed_to_the_http2_side_made_lazily(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType("sidecar.proxy.http2")
    module.H2Side = _FakeH2Side  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sidecar.proxy.http2", module)
    _FakeH2Side.made.clear()
    proxy = await make_proxy()
    assert _FakeH2Side.made == [], "not made before the first HTTP/2 connection"
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    writer.write(PREFACE[:10])
    await asyncio.sleep(0.05)
    writer.write(PREFACE[10:] + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == ["outbound", None]
    (side,) = _FakeH2Side.made
    assert side.got.startswith(PREFACE)  # the first bytes reach it, preface included
    assert _count(proxy, "outbound", "http2") == 1
    assert proxy.open_flows().get("stable") == 1
    writer.close()
