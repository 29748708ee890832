"""``H2Side``: the HTTP/2 half of the proxy, handed connections that open with the preface.

Created by the proxy on the first such connection, so the nghttp2 binding is
loaded only when a client needs it. It owns the upstream pool, the set of
client connections, the sessions waiting to send, and a sweeper for idle
connections and upstreams that do not answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sidecar.proxy.http1.exchange import parse_authority
from sidecar.proxy.http2 import headers as h
from sidecar.proxy.http2.binding import CANCEL
from sidecar.proxy.http2.connection import Conn, Downstream
from sidecar.proxy.http2.pool import H2Pool
from sidecar.proxy.settle import stop_sweeper_and_settle

if TYPE_CHECKING:
    from sidecar.policy import Timeouts
    from sidecar.proxy.context import ProxyContext

log = logging.getLogger(__name__)

_AUTHORITY_CACHE = 4096


class H2Side:
    """Both directions' HTTP/2 connections of one proxy (see the BRIEF's handoff contract)."""

    def __init__(self, ctx: ProxyContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.pool = H2Pool(self)
        self.downs: set[Downstream] = set()
        self.dirty: set[Conn] = set()  # sessions with frames to send after this callback
        self.draining = False
        self._authorities: dict[bytes, tuple[str, int]] = {}
        # Whether a new upstream connection (its ``addrs``) reached our own outbound
        # listener; whoever owns the listeners sets it (the HTTP/1 side's check).
        self.loops_back: Callable[[Any], bool] = lambda conn: False
        self._sweeper: asyncio.Task[None] | None = None

    def protocol(self, direction: str, dst: tuple[str, int] | None) -> asyncio.Protocol:
        """A protocol for a client connection of ``direction`` ("outbound" or "inbound")."""
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep(), name="h2-sweeper")
        return Downstream(self, direction, dst)

    def open_flows(self) -> dict[str, int]:
        """color -> upstream HTTP/2 connections open now."""
        return self.pool.counts()

    def authority(self, value: bytes) -> tuple[str, int]:
        """``:authority`` -> (host, port), remembered: apps talk to few upstreams."""
        try:
            return self._authorities[value]
        except KeyError:
            pass
        hostport = parse_authority(value, 80)
        if len(self._authorities) >= _AUTHORITY_CACHE:
            self._authorities.clear()
        self._authorities[value] = hostport
        return hostport

    def flush(self) -> None:
        """Send what every marked session has (sending one may mark another)."""
        dirty = self.dirty
        while dirty:
            dirty.pop().flush()

    async def drain(self, timeout: float) -> None:
        """GOAWAY to every client; streams in flight finish, until ``timeout``."""
        self.draining = True
        for down in list(self.downs):
            down.session.goaway()
            down.mark()
        self.flush()
        deadline = self.loop.time() + timeout
        while self.downs and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for down in list(self.downs):
            if down.transport is not None:
                down.transport.abort()
        self.pool.close_all()
        sweeper, self._sweeper = self._sweeper, None
        await stop_sweeper_and_settle(sweeper, lambda: not self.pool.open)

    async def _sweep(self) -> None:
        from sidecar.proxy.server import sweep_interval

        while True:
            timeouts = self.ctx.timeouts
            await asyncio.sleep(sweep_interval(timeouts))
            try:
                self._sweep_once(timeouts)
            except Exception:
                log.exception("h2 sweeper failed; continuing")

    def _sweep_once(self, t: Timeouts) -> None:
        now = self.loop.time()
        for down in list(self.downs):
            if not down.relays and now - down.idle_since >= t.idle:
                down.session.goaway()
                down.mark()
                continue
            clock = perf_counter()
            for relay in list(down.relays.values()):
                # No answer head in time: 504 / DEADLINE_EXCEEDED.
                if relay.status:
                    continue
                limit = relay.answer_limit(t.upstream_read)
                if limit is not None and clock - relay.t0 >= limit:
                    up = relay.up
                    if up is not None and relay.up_sid in up.streams:
                        up.session.reset(relay.up_sid, CANCEL)
                        up.mark()
                        del up.streams[relay.up_sid]
                        relay.up = None
                    relay.fail(h.TIMEOUT)
        self.pool.sweep(now, t.upstream_idle)
        self.flush()
