"""The ``Proxy`` facade: two listening sides, the shared pool, timeouts and graceful drain.

The lead's runtime builds a ``ProxyContext`` and swaps its ``colorer``,
``timeouts`` and ``app`` on reload; the proxy reads them per request (and the
sweeper per tick), so a reload needs no restart and no call into the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sidecar.policy import Address, Timeouts
from sidecar.proxy.context import ProxyContext
from sidecar.proxy.http1.downstream import Downstream, Shared, access_log

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024


def sweep_interval(t: Timeouts) -> float:
    """How often the sweeper looks: a quarter of the shortest timeout, within [5 ms, 1 s]."""
    shortest = min(t.header_read, t.idle, t.upstream_idle, t.upstream_read)
    return min(1.0, max(0.005, shortest / 4))


class Proxy:
    """The outbound (app -> world) and inbound (world -> app) HTTP sides of the sidecar."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._shared: Shared | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._h2: Any = None  # H2Side, made on the first HTTP/2 connection (see ``_Sniff``)

    async def start(self, outbound: Address, inbound: Address) -> None:
        """Listen on both sides (port 0 picks a free port; see ``addresses``)."""
        loop = asyncio.get_running_loop()
        shared = self._shared = Shared(self.ctx, loop)
        for direction, where in (("outbound", outbound), ("inbound", inbound)):
            server = await loop.create_server(
                lambda d=direction: _Sniff(self, shared, d),  # type: ignore[misc]
                where.host,
                where.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
            self._servers[direction] = server
            sockname = server.sockets[0].getsockname()
            self._addresses[direction] = (sockname[0], sockname[1])
        out_port = self._addresses["outbound"][1]
        for sock in self._servers["outbound"].sockets:
            shared.own.add((sock.getsockname()[0], out_port))
            shared.listening.append((sock.getsockname()[0], out_port))
        if outbound.host in ("0.0.0.0", "::", ""):
            shared.own.update({("127.0.0.1", out_port), ("localhost", out_port), ("::1", out_port)})
        else:
            shared.own.add((outbound.host, out_port))
        self._sweeper = loop.create_task(self._sweep(), name="proxy-sweeper")
        log.info(
            "proxy listening: outbound=%s inbound=%s",
            self._addresses["outbound"],
            self._addresses["inbound"],
        )

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return dict(self._addresses)

    def open_flows(self) -> dict[str, int]:
        """color -> upstream connections open now (pooled, busy and tunnels)."""
        flows = self._shared.pool.counts() if self._shared is not None else {}
        for color, n in (self._h2.open_flows() if self._h2 is not None else {}).items():
            flows[color] = flows.get(color, 0) + n
        return flows

    def parked_flows(self) -> int:
        """Idle upstream flows held without a transport (see ``Pool``): open all the same."""
        if self._shared is None:
            return 0
        return sum(len(parked) for parked in self._shared.pool.parked.values())

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish, then close everything.

        Idle keep-alive connections close at once; busy ones answer their current
        request with ``Connection: close``; whatever is left at the deadline is cut.
        """
        shared = self._shared
        if shared is None:
            return
        shared.draining = True
        for server in self._servers.values():
            server.close()
        h2 = self._h2.drain(timeout) if self._h2 is not None else asyncio.sleep(0)
        h2_drained = asyncio.ensure_future(h2)
        shared.pool.close_idle()
        for conn in list(shared.conns):
            if not conn.queue and conn.tunnel is None:
                conn._close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while shared.conns and loop.time() < deadline:
            await asyncio.sleep(0.01)
        left = len(shared.conns)
        if left:
            log.warning("drain deadline (%.1fs): closing %d busy connection(s)", timeout, left)
        for conn in list(shared.conns):
            if conn.tunnel is not None:
                conn.tunnel.close()
            if conn.transport is not None:
                conn.transport.abort()
        shared.pool.close_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        # Let connection_lost callbacks (flow_close hooks) run before returning.
        for _ in range(50):
            if not shared.pool.open and not shared.conns:
                break
            await asyncio.sleep(0.01)
        await h2_drained
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def h2(self) -> Any:
        """The HTTP/2 side, made (and the nghttp2 binding loaded) on first use; None if absent."""
        if self._h2 is None:
            try:
                from sidecar.proxy.http2 import H2Side
            except ImportError:
                log.warning("HTTP/2 binding not importable: HTTP/2 connections are refused")
                return None
            self._h2 = H2Side(self.ctx, asyncio.get_running_loop())
            if self._shared is not None:
                self._h2.loops_back = self._shared.loops_back
        return self._h2

    async def _sweep(self) -> None:
        shared = self._shared
        assert shared is not None
        loop = asyncio.get_running_loop()
        while True:
            timeouts = self.ctx.timeouts
            await asyncio.sleep(sweep_interval(timeouts))
            now = loop.time()
            try:
                for conn in list(shared.conns):
                    conn.sweep(now, timeouts)
                shared.pool.sweep(now, timeouts.upstream_idle)
                shared.access_log = access_log.isEnabledFor(logging.DEBUG)
            except Exception:
                log.exception("proxy sweeper failed; continuing")


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Sniff(asyncio.Protocol):
    """Until the front door lands (issue 12): a connection opening with the HTTP/2 preface
    goes to the HTTP/2 side, any other to HTTP/1's ``Downstream`` (made at once, so its
    header-read timeout covers a client that sends nothing)."""

    __slots__ = ("d", "direction", "head", "proxy", "shared", "transport")

    def __init__(self, proxy: Proxy, shared: Shared, direction: str) -> None:
        self.proxy, self.shared, self.direction = proxy, shared, direction
        self.d = Downstream(shared, direction)
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.d.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        data = self.head + data
        if len(data) < len(_PREFACE) and _PREFACE.startswith(data):
            self.head = data
            return
        p: asyncio.Protocol = self.d
        h2 = self.proxy.h2() if data.startswith(_PREFACE) else None
        if h2 is not None:
            self.shared.conns.discard(self.d)
            p = h2.protocol(self.direction, None)
            p.connection_made(self.transport)
        self.transport.set_protocol(p)  # type: ignore[attr-defined]
        p.data_received(data)

    def eof_received(self) -> bool | None:
        return self.d.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.d.connection_lost(exc)
