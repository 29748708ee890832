"""The two kinds of HTTP/2 connection: ``Downstream`` (a client's, server session) and
``Upstream`` (ours to a destination of one color, client session).

Both are asyncio Protocols over one nghttp2 ``Session``. Bytes read go to
``recv``; nghttp2 calls back per header block, DATA chunk and event; the
connections touched are marked dirty and sent once ``recv`` returns
(``H2Side.flush``). A connection whose writes are paused sends nothing more,
which in turn leaves the other leg's bytes unconsumed (``stream.Relay``).
Whatever nghttp2 decides about bad input (stream errors, GOAWAY with
PROTOCOL_ERROR, ENHANCE_YOUR_CALM for floods and rapid reset) it sends; once it
wants neither to read nor to write, the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sidecar.errors import DownstreamProtocolError
from sidecar.proxy.http2 import headers as h
from sidecar.proxy.http2.binding import (
    CANCEL,
    CLOSED,
    ENHANCE_YOUR_CALM,
    EV_CLOSE,
    EV_DRAINED,
    EV_GOAWAY,
    EV_NOT_SENT,
    HCAT_HEADERS,
    HCAT_REQUEST,
    HCAT_RESPONSE,
    INTERNAL_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ClosedSession,
    H2Error,
    Session,
)
from sidecar.proxy.http2.stream import Relay
from sidecar.proxy.lanes import LANE

if TYPE_CHECKING:
    from sidecar.proxy.context import Key
    from sidecar.proxy.http2.pool import H2Pool
    from sidecar.proxy.http2.side import H2Side
    from sidecar.proxy.lanerouter import LaneRouter
    from sidecar.proxy.lanes import Choice

log = logging.getLogger(__name__)

# nghttp2's fatal errors that mean "too much of something": NGHTTP2_ERR_FLOODED (acks owed
# to a peer that does not read) and NGHTTP2_ERR_TOO_MANY_CONTINUATIONS (CVE-2024-27316).
_CALM_DOWN = frozenset({-904, -905})
MAX_STREAMS_PER_UPSTREAM = 256  # streams put on one upstream before its SETTINGS says less


class Conn(asyncio.Protocol):
    """What both kinds share: the session, its transport, sending and closing."""

    side: H2Side
    session: Session | ClosedSession

    def __init__(self, side: H2Side, server: bool) -> None:
        self.side = side
        self.session = Session(server, self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False  # the transport's buffer is full: send nothing more for now

    def mark(self) -> None:
        self.side.dirty.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.session.recv(data)
        except H2Error as exc:
            self._fatal(exc)
        self.mark()
        self.side.flush()

    def _fatal(self, exc: H2Error) -> None:
        """nghttp2 gave up on the connection: say why in a GOAWAY if it can, then close."""
        log.info("HTTP/2 connection error: %s", exc)
        code = ENHANCE_YOUR_CALM if exc.code in _CALM_DOWN else PROTOCOL_ERROR
        try:
            self.session.terminate(code)
            out = self.session.send()
        except H2Error:
            out = b""
        if self.transport is not None:
            if out:
                self.transport.write(out)
            self.transport.close()
        self.closed = True

    def flush(self) -> None:
        """Send what the session has; close once it wants neither to read nor to write."""
        transport = self.transport
        if self.closed or transport is None or self.paused:
            return
        try:
            out = self.session.send()
        except H2Error as exc:
            self._fatal(exc)
            return
        if out:
            transport.write(out)
        if self.session.finished():
            self.closed = True
            transport.close()

    def release(self) -> None:
        """After ``connection_lost``: the C session goes now (see ``ClosedSession``)."""
        self.side.loop.call_soon(setattr, self, "session", CLOSED)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.mark()
        self.side.flush()


class Downstream(Conn):
    """A client's connection on one side of the sidecar: each stream becomes a ``Relay``."""

    def __init__(self, side: H2Side, direction: str, dst: tuple[str, int] | None) -> None:
        super().__init__(side, server=True)
        self.direction = direction
        self.outbound = direction == "outbound"
        self.counts = side.ctx.metrics.direction(direction)
        self.dst = dst
        self.relays: dict[int, Relay] = {}
        self.trusted = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        side = self.side
        side.downs.add(self)  # counted in traffic_color_connections_total by the front door
        self.idle_since = side.loop.time()
        if not self.outbound:
            peer = transport.get_extra_info("peername")
            self.trusted = side.ctx.colorer.peer_trusted(peer[0] if peer else None)
        if side.draining:
            self.session.goaway()
        self.mark()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.side.downs.discard(self)
        self.side.dirty.discard(self)
        relays, self.relays = self.relays, {}
        for relay in relays.values():  # upstream streams of a closed client are reset
            relay.down_closed(CANCEL)
        self.side.flush()
        self.release()

    # ------------------------------------------------------------ from nghttp2

    def on_headers(self, sid: int, cat: int, block: bytes, end: bool, over: bool) -> None:
        if cat == HCAT_REQUEST:
            self._request(sid, block, end, over)
        elif cat == HCAT_HEADERS:  # request trailers (nghttp2 checks they end the stream)
            relay = self.relays.get(sid)
            if relay is not None:
                relay.request_end(None if over else block)

    def on_data(self, sid: int, data: bytes, end: bool) -> None:
        relay = self.relays.get(sid)
        if relay is None:
            if data:
                self.session.consume(sid, len(data))
            return
        if data:
            relay.request_data(data)
        if end:
            relay.request_end(None)

    def on_event(self, kind: int, sid: int, code: int) -> None:
        if kind == EV_CLOSE:
            relay = self.relays.pop(sid, None)
            if relay is not None:
                relay.down_closed(code)
            if not self.relays:
                self.idle_since = self.side.loop.time()
        elif kind == EV_DRAINED:
            relay = self.relays.get(sid)
            if relay is not None:
                relay.response_drained()

    def _request(self, sid: int, block: bytes, end: bool, over: bool) -> None:
        relay = Relay(self, sid, perf_counter())
        self.relays[sid] = relay
        relay.req_end = end
        if over:
            relay.color = self.side.ctx.colorer.pod_color
            relay.fail(h.TOO_LARGE)
            return
        f = h.fields(block)
        relay.grpc = grpc = h.is_grpc(f)
        if grpc:
            relay.grpc_timeout = h.grpc_timeout(f)
        ctx = self.side.ctx
        colorer = ctx.colorer
        header = colorer.header
        own = h.values_of(f, header)
        if self.outbound:
            color, reason = colorer.outbound(own)
        else:
            wanted = colorer.inbound_capture
            color, reason = colorer.inbound(
                own, h.captured(f, wanted) if wanted else {}, self.trusted
            )
        bag = None
        if colorer.baggage_key is not None:
            values = h.values_of(f, h.BAGGAGE)
            color, reason, event, bag = colorer.with_baggage(
                color, reason, values, self.outbound or self.trusted
            )
            if event is not None:
                self.counts.baggage[event] += 1
            if bag == tuple(values):
                bag = None  # forwarded as it came (already carrying the color, or malformed)
        relay.color = color
        if reason is not None:
            self.counts.rewrites[reason] += 1
        # The color field is written unless the request's own was kept (a color taken
        # from baggage has none yet).
        recolor = reason is not None or not own
        if recolor or bag is not None:
            block = h.rewrite(block, f, header, color.encode() if recolor else None, bag)
        relay.block = block
        try:
            host, port = self._upstream(f)
        except DownstreamProtocolError:
            relay.fail(h.BAD_REQUEST)
            return
        relay.key = (color, host, port)
        lanes = ctx.lanes
        if lanes is not None and self.outbound:
            choice = self._lane(lanes, f, color, host, port, reason is None)
            if choice is not None and choice.why == LANE:
                relay.lane = choice
                relay.key = (color, choice.host, choice.port)
        self.side.pool.assign(relay)

    def _lane(
        self, lanes: LaneRouter, f: h.Fields, color: str, host: str, port: int, carried: bool
    ) -> Choice | None:
        """Where a stream of ``color`` goes by the lane routes (``lanes.py``): the name is
        the ``:authority``'s; captured, the port is the one dialled and the destination
        dialled is what a non-lane choice and an empty lane's fallback get. None: no
        usable name (a captured stream without ``:authority`` goes where it was sent)."""
        dst = self.dst
        if dst is None:
            return lanes.choose(color, host, port, carried)
        value = h.authority(f)
        if not value:
            return None
        try:
            name = self.side.authority(value)[0]
        except DownstreamProtocolError:
            return None
        return lanes.choose(color, name, dst[1], carried, dst)

    def _upstream(self, f: h.Fields) -> tuple[str, int]:
        """Outbound: the captured destination, else ``:authority``; inbound: the app."""
        dst = self.dst
        if self.outbound:
            if dst is not None:
                return dst
            value = h.authority(f)
            if not value:
                raise DownstreamProtocolError("no :authority")
            return self.side.authority(value)
        app = self.side.ctx.app
        return (app.host, dst[1]) if dst is not None else (app.host, app.port)


class Upstream(Conn):
    """Our connection to one destination for one color; streams of many clients share it."""

    def __init__(self, pool: H2Pool, key: Key) -> None:
        super().__init__(pool.side, server=False)
        self.pool = pool
        self.key = key
        self.streams: dict[int, Relay] = {}
        self.waiting: list[Relay] = []  # assigned while connecting
        self.connected = False
        self.retired = False  # GOAWAY received or closing: no new streams
        self.addrs: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.hooks: Any = None  # the hooks that heard flow_open
        self.lane: Choice | None = None  # the lane this connection is to, if any
        self.lanes: LaneRouter | None = None  # the router that chose it (reloads swap it)
        self.idle_since = pool.side.loop.time()

    def room(self) -> int:
        if self.retired or self.closed:
            return 0
        limit = min(self.session.remote_max_streams(), MAX_STREAMS_PER_UPSTREAM)
        return limit - len(self.streams) - len(self.waiting)

    def take(self, relay: Relay) -> None:
        if self.connected:
            relay.start(self)
        else:
            self.waiting.append(relay)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected = True
        if self.addrs is None:
            local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
            if local and peer:
                self.addrs = ((local[0], local[1]), (peer[0], peer[1]))
        self.pool.opened(self)
        if self.addrs is not None and self.side.loops_back(self):
            self.retired = True
            self.failed(h.LOOP)
            transport.close()
            return
        waiting, self.waiting = self.waiting, []
        for relay in waiting:
            relay.start(self)
        self.mark()
        self.side.flush()  # the preface and requests leave now, not when the server speaks

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.retired = True
        self.side.dirty.discard(self)
        self.pool.lost(self)
        streams, self.streams = self.streams, {}
        for relay in streams.values():
            relay.up_closed(INTERNAL_ERROR)
        self.side.flush()
        self.release()

    def failed(self, kind: str) -> None:
        """The connection could not be made (or must not be used): its waiting streams get
        the proxy's answer."""
        self.closed = self.retired = True
        waiting, self.waiting = self.waiting, []
        for relay in waiting:
            relay.fail(kind)
        self.side.flush()
        self.release()

    # ------------------------------------------------------------ from nghttp2

    def on_headers(self, sid: int, cat: int, block: bytes, end: bool, over: bool) -> None:
        relay = self.streams.get(sid)
        if relay is None:
            return
        if over:
            self.session.reset(sid, CANCEL)
            relay.fail(h.UNAVAILABLE)
        elif cat == HCAT_RESPONSE or (cat == HCAT_HEADERS and relay.status == 0):
            relay.response_head(block, end)
        elif cat == HCAT_HEADERS:
            relay.response_end(block)

    def on_data(self, sid: int, data: bytes, end: bool) -> None:
        relay = self.streams.get(sid)
        if relay is None:
            if data:
                self.session.consume(sid, len(data))
            return
        if data:
            relay.response_data(data)
        if end:
            relay.response_end(None)

    def on_event(self, kind: int, sid: int, code: int) -> None:
        if kind in (EV_CLOSE, EV_NOT_SENT):
            relay = self.streams.pop(sid, None)
            if relay is not None:
                relay.up_closed(code if kind == EV_CLOSE else REFUSED_STREAM)
            if not self.streams:
                self.idle_since = self.side.loop.time()
                if self.retired:
                    self.session.goaway()
        elif kind == EV_GOAWAY:
            self.retired = True
            self.pool.retire(self)
        elif kind == EV_DRAINED:
            relay = self.streams.get(sid)
            if relay is not None:
                relay.request_drained()

    def close(self) -> None:
        """GOAWAY and close now (idle, or the proxy is stopping)."""
        self.retired = True
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        try:
            self.session.goaway()
            out = self.session.send()
        except H2Error:
            out = b""
        if out:
            transport.write(out)
        transport.close()
