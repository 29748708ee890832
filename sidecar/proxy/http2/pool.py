"""Upstream HTTP/2 connections kept per (color, host, port): one TCP flow, one color.

Streams of many clients share a connection until the peer's
SETTINGS_MAX_CONCURRENT_STREAMS is reached; the next one opens a sibling of the
same color. Each new flow is told to the flow hooks before its SYN leaves (as
the HTTP/1 pool does), so the kernel marks the whole flow, handshake included.

A stream that chose a lane (``Relay.lane``, ``lanes.py``) is keyed by the lane's
host, so lane flows never mix with others. The first stream of a lane key makes
the connection through ``LaneRouter.open``; when the lane turns out empty, every
stream waiting on it falls back on its own (counted per stream) to its original
destination, keeping its color, or gets 503 / UNAVAILABLE with ``fallback:
fail``. While a lane is known to be empty, its streams fall back at once, with no
connection attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from sidecar.proxy.context import Key
from sidecar.proxy.http2 import headers as h
from sidecar.proxy.http2.connection import Upstream
from sidecar.proxy.lanes import EmptyLane, LaneTable
from sidecar.proxy.pool import (
    _call_hook,
    color_dscp,
    connect_flow,
    dscp_changes,
    set_transport_dscp,
)

if TYPE_CHECKING:
    from sidecar.proxy.http2.side import H2Side
    from sidecar.proxy.http2.stream import Relay

log = logging.getLogger(__name__)


class H2Pool:
    def __init__(self, side: H2Side) -> None:
        self.side = side
        self.ctx = side.ctx
        self.loop = side.loop
        self.usable: dict[Key, list[Upstream]] = {}  # connections that take new streams
        self.open: set[Upstream] = set()  # every connection, connecting to closing
        self.closed = False

    def assign(self, relay: Relay) -> None:
        """Put ``relay`` on a connection of its key with room, or on a new one."""
        if self.closed:
            relay.fail(h.UNAVAILABLE)
            return
        key = relay.key
        conns = self.usable.get(key)
        if conns is None:
            conns = self.usable[key] = []
        lane = relay.lane
        for conn in conns:
            # A connection still being made is either a lane's (its streams fall back
            # when the lane is empty) or not: a stream joins only one of its own kind.
            if conn.room() > 0 and (conn.connected or (conn.lane is None) == (lane is None)):
                conn.take(relay)
                return
        if lane is not None:
            lanes = self.ctx.lanes
            down = lanes.cache.known_empty(lane.host, lane.port) if lanes is not None else None
            if down is not None:  # tried within its TTL: no new attempt
                if not conns:
                    del self.usable[key]
                self._fall_back(relay, down)
                return
        conn = Upstream(self, key)
        conn.lane = lane
        conn.lanes = self.ctx.lanes if lane is not None else None  # a reload may follow
        conns.append(conn)
        self.open.add(conn)
        conn.take(relay)
        self.loop.create_task(self._connect(conn))

    def _fall_back(self, relay: Relay, reason: str) -> None:
        """``relay``'s lane is empty: its original destination, same color; or 503."""
        lane, relay.lane = relay.lane, None
        assert lane is not None
        lanes = self.ctx.lanes  # None: the routes went away in a reload meanwhile
        back = LaneTable.fallback(lane, reason) if lanes is None else lanes.fall_back(lane, reason)
        if back is None:
            relay.fail(h.EMPTY_LANE)
            return
        relay.key = (relay.color, back.host, back.port)
        self.assign(relay)

    def forget(self, relay: Relay) -> None:
        """A client stream closed while its connection was still being made."""
        for conn in self.usable.get(relay.key, ()):
            if relay in conn.waiting:
                conn.waiting.remove(relay)
                return

    def retire(self, conn: Upstream) -> None:
        conns = self.usable.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.usable[conn.key]

    def opened(self, conn: Upstream) -> None:
        self.ctx.metrics.flow_opened(conn.key[0])

    def lost(self, conn: Upstream) -> None:
        self.retire(conn)
        if conn not in self.open:
            return
        self.open.discard(conn)
        if conn.connected:
            self.ctx.metrics.flow_closed(conn.key[0])
        hooks, conn.hooks = conn.hooks, None
        if hooks is not None and conn.addrs is not None:
            _call_hook(hooks.flow_close, conn.key[0], *conn.addrs)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for conn in self.open:
            out[conn.key[0]] = out.get(conn.key[0], 0) + 1
        return out

    def set_dscp(self, changes: dict[str, int]) -> int:
        """Each changed color's DSCP on its open connections, as ``Pool.set_dscp``."""
        done = 0
        for conn in list(self.open):
            dscp = changes.get(conn.key[0])
            if dscp is not None:
                done += set_transport_dscp(conn.transport, dscp)
        return done

    def sweep(self, now: float, idle: float) -> None:
        for conn in list(self.open):
            if conn.connected and not conn.streams and now - conn.idle_since >= idle:
                self.retire(conn)
                conn.close()

    def close_all(self) -> None:
        self.closed = True
        for conn in list(self.open):
            self.retire(conn)
            if conn.transport is not None:
                conn.close()

    # ------------------------------------------------------------ connecting

    async def _connect(self, conn: Upstream) -> None:
        lanes = conn.lanes
        try:
            if conn.lane is not None and lanes is not None:
                await lanes.open(conn.lane, functools.partial(self._lane_connect, conn))
            else:
                async with asyncio.timeout(self.ctx.timeouts.connect):
                    await self._open(conn)
        except EmptyLane as exc:
            self._given_up(conn)
            waiting, conn.waiting = conn.waiting, []
            conn.failed(h.UNAVAILABLE)  # nobody waits on it any more
            try:
                for relay in waiting:
                    if not relay.status:  # else answered meanwhile (its deadline)
                        self._fall_back(relay, exc.reason)
            finally:
                self.side.flush()
        except TimeoutError:
            self._given_up(conn)
            conn.failed(h.TIMEOUT)
        except OSError as exc:
            log.debug("h2 upstream %s: %s", conn.key, exc)
            self._given_up(conn)
            conn.failed(h.UNAVAILABLE)

    async def _lane_connect(self, conn: Upstream, address: str, timeout: float) -> None:
        """``LaneRouter.open``'s connect: ``address`` of the lane, within ``timeout``."""
        async with asyncio.timeout(min(timeout, self.ctx.timeouts.connect)):
            await self._open(conn, address)

    def _given_up(self, conn: Upstream) -> None:
        """A connection that will never be made: out of the pool, its flow forgotten."""
        self.retire(conn)
        self.open.discard(conn)
        hooks, conn.hooks = conn.hooks, None
        if hooks is not None and conn.addrs is not None:
            _call_hook(hooks.flow_close, conn.key[0], *conn.addrs)

    async def _open(self, conn: Upstream, address: str | None = None) -> None:
        """Connect; with flow hooks, bind first and register the 4-tuple before the SYN.

        In capture mode the socket carries the sidecar's own mark (SO_MARK), so the
        capture rules leave it alone; a color with a DSCP has it set on the socket, so
        the node agent routes the flow (as the HTTP/1 pool does). ``address``: the one
        a lane's lookup found for the key's host.
        """
        color, host, port = conn.key
        host = address or host
        hooks = self.ctx.hooks
        mark = self.ctx.own_mark
        policy = self.ctx.colorer.policy
        dscp = color_dscp(policy, color)
        try:
            await self._dial(conn, host, port, hooks, mark, dscp)
        finally:
            if self.ctx.colorer.policy is not policy:  # reloaded meanwhile: see ``set_dscp``
                changed = dscp_changes(policy, self.ctx.colorer.policy).get(color)
                if changed is not None:
                    set_transport_dscp(conn.transport, changed)

    async def _dial(
        self, conn: Upstream, host: str, port: int, hooks: Any, mark: int, dscp: int | None
    ) -> None:
        color = conn.key[0]
        if hooks is None and not mark and dscp is None:
            await self.loop.create_connection(lambda: conn, host, port)
            return

        def register(local: tuple, remote: tuple) -> None:
            conn.addrs = ((sys.intern(local[0]), local[1]), (remote[0], remote[1]))
            conn.hooks = hooks
            _call_hook(hooks.flow_open, color, *conn.addrs)  # type: ignore[union-attr]

        def unregister() -> None:
            if conn.hooks is not None:
                conn.hooks = None
                _call_hook(hooks.flow_close, color, *conn.addrs)  # type: ignore[misc, union-attr]

        async def transport(sock: socket.socket) -> None:
            await self.loop.create_connection(lambda: conn, sock=sock)

        await connect_flow(
            self.loop,
            host,
            port,
            transport,
            mark=mark,
            dscp=dscp,
            register=register if hooks is not None else None,
            unregister=unregister,
        )
