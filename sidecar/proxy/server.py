"""The ``Proxy`` facade: two listening sides, the shared pool, timeouts and graceful drain.

The lead's runtime builds a ``ProxyContext`` and swaps its ``colorer``,
``timeouts`` and ``app`` on reload; the proxy reads them per request (and the
sweeper per tick), so a reload needs no restart. The one call into the proxy a
reload makes is ``set_dscp``: flows already open get a changed color's DSCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sidecar.policy import Address, Timeouts
from sidecar.proxy.context import ProxyContext
from sidecar.proxy.http1.downstream import Shared, access_log
from sidecar.proxy.listener import Door, FrontDoor
from sidecar.proxy.settle import stop_sweeper_and_settle

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
        self._door: Door | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._twins: dict[str, asyncio.AbstractServer] = {}  # IPv6 listeners in capture mode
        self._addresses: dict[str, tuple[str, int]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, outbound: Address, inbound: Address) -> None:
        """Listen on both sides (port 0 picks a free port; see ``addresses``)."""
        loop = asyncio.get_running_loop()
        shared = self._shared = Shared(self.ctx, loop)
        door = self._door = Door(shared)
        for direction, where in (("outbound", outbound), ("inbound", inbound)):
            server = await loop.create_server(
                lambda d=direction: FrontDoor(door, d),  # type: ignore[misc]
                where.host,
                where.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
            self._servers[direction] = server
            sockname = server.sockets[0].getsockname()
            self._addresses[direction] = (sockname[0], sockname[1])
            twin = _ipv6_twin(where.host) if self.ctx.capture is not None else None
            if twin is not None:
                await self._listen_twin(direction, twin, sockname[1])
        out_port = self._addresses["outbound"][1]
        for server in (self._servers["outbound"], self._twins.get("outbound")):
            for sock in server.sockets if server is not None else ():
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

    async def _listen_twin(self, direction: str, host: str, port: int) -> None:
        """The IPv6 listener beside an IPv4 one: capture redirects IPv6 flows to ``::1``
        (outbound) or the interface's address (inbound), on the same port."""
        door = self._door
        try:
            self._twins[direction] = await asyncio.get_running_loop().create_server(
                lambda: FrontDoor(door, direction),  # type: ignore[arg-type]
                host,
                port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:  # no IPv6 in this namespace: IPv6 is not captured either
            log.warning("no IPv6 %s listener on [%s]:%d: %s", direction, host, port, exc)

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return dict(self._addresses)

    def open_flows(self) -> dict[str, int]:
        """color -> upstream connections open now (pooled, busy, tunnels, relays, HTTP/2)."""
        if self._shared is None:
            return {}
        counts = self._shared.pool.counts()
        h2 = self._door.h2 if self._door is not None else None
        if h2 is not None:
            for color, n in h2.open_flows().items():
                counts[color] = counts.get(color, 0) + n
        return counts

    def set_dscp(self, changes: dict[str, int]) -> int:
        """color -> DSCP (``pool.dscp_changes``) on every open upstream flow of those colors,
        HTTP/1 and HTTP/2: a pooled flow would carry the old one until it closed. How many."""
        if not changes or self._shared is None:
            return 0
        done = self._shared.pool.set_dscp(changes)
        h2 = self._door.h2 if self._door is not None else None
        if h2 is not None:
            done += h2.pool.set_dscp(changes)
        return done

    def parked_flows(self) -> int:
        """Idle upstream flows held without a transport (see ``Pool``): open all the same."""
        if self._shared is None:
            return 0
        return sum(len(parked) for parked in self._shared.pool.parked.values())

    async def drain(self, timeout: float, accept_for: float = 0.0) -> None:
        """Serve on for ``accept_for`` seconds, stop accepting, let in-flight requests finish.

        While accepting, both listeners take new connections and every answer says
        ``Connection: close``: clients move to other endpoints as the removal of this
        one spreads, and an app still shutting down can call out. Then idle keep-alive
        connections close at once (those that never got a request are left their
        chance to send it); busy ones answer their current request with ``Connection:
        close``; whatever is left at the ``timeout`` deadline is cut.
        """
        shared = self._shared
        if shared is None:
            return
        shared.draining = True
        # HTTP/2 clients get GOAWAY at once, so they move on while the listeners still
        # accept; their streams in flight finish within the whole drain.
        h2 = self._door.h2 if self._door is not None else None
        h2_drain = asyncio.ensure_future(h2.drain(accept_for + timeout)) if h2 is not None else None
        if accept_for > 0:
            shared.accepting = True
            try:
                await asyncio.sleep(accept_for)
            finally:
                shared.accepting = False
            h2 = self._door.h2 if self._door is not None else None
            if h2_drain is None and h2 is not None:  # its first connection came meanwhile
                h2_drain = asyncio.ensure_future(h2.drain(timeout))
        for server in (*self._servers.values(), *self._twins.values()):
            server.close()
        shared.pool.close_idle()
        for conn in list(shared.conns):
            if not conn.queue and conn.tunnel is None and (conn.served or not accept_for):
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
        sweeper, self._sweeper = self._sweeper, None
        await stop_sweeper_and_settle(sweeper, lambda: not shared.pool.open and not shared.conns)
        if h2_drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h2_drain, 1.0)
        for server in (*self._servers.values(), *self._twins.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

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


def _ipv6_twin(host: str) -> str | None:
    """Where the IPv6 side of an IPv4 listener goes in capture mode (None: it has one)."""
    return {"127.0.0.1": "::1", "0.0.0.0": "::"}.get(host)
