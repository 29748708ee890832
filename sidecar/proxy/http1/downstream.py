"""The downstream side: an asyncio Protocol per client connection, parsed by httptools.

Shaped like uvicorn's ``httptools_impl``: the parser callbacks only collect the
request's state into a ``Request``; ``_start`` makes the decisions (target,
color, forwarded head) once the head is complete and hands the request to an
upstream connection, and ``response_done`` (called by that connection) moves
the pipeline on. Bodies are never buffered whole: they go straight to the
upstream, or are held for the short time an upstream connection is being
opened or a pipelined request waits its turn, with reading paused meanwhile.

Errors in what the client sent are raised deep (``DownstreamProtocolError``
with its status) and translated once, in ``data_received``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from sidecar.coloring import MISSING, Colorer
from sidecar.errors import DownstreamProtocolError
from sidecar.proxy.batch import WriteBatch
from sidecar.proxy.flow import PEER_FULL, QUEUED, WAITING, FlowControl
from sidecar.proxy.http1.exchange import (
    CONNECT_ESTABLISHED,
    HOP_BY_HOP,
    LAST_CHUNK,
    MAX_HEADER_BYTES,
    MAX_REQUEST_LINE,
    chunk,
    connection_tokens,
    drop_headers,
    error_response,
    extra_hop_headers,
    inbound_target,
    is_chunked,
    outbound_target,
    parse_authority,
)
from sidecar.proxy.http1.upstream import UpstreamConnection
from sidecar.proxy.lanes import LANE, Choice, EmptyLane, LaneTable
from sidecar.proxy.opaque import Tunnel
from sidecar.proxy.pool import Pool

if TYPE_CHECKING:
    from sidecar.admin.metrics import DirectionCounts
    from sidecar.policy import Timeouts
    from sidecar.proxy.context import Key, ProxyContext
    from sidecar.proxy.lanerouter import LaneRouter

log = logging.getLogger(__name__)
access_log = logging.getLogger("sidecar.access")
_DEBUG = logging.DEBUG

_EMPTY: dict[bytes, list[bytes]] = {}
_HOST = b"host"  # by identity: a Host spelling whose only handling is Host's (``_classify``)
_EMPTY_NAMES: dict[bytes, bytes] = {}
_EMPTY_ENDS: dict[str, bytes] = {}
# Bytes of a request head that may sit unparsed across reads before it is refused.
_MAX_PENDING_HEAD = MAX_REQUEST_LINE + MAX_HEADER_BYTES
_AUTHORITY_CACHE = 4096  # distinct Host values remembered before the cache starts over
_NAMES_CACHE = 1024  # distinct header name spellings remembered per side before starting over

# What a downstream connection is waiting for, for the sweeper's timeouts.
_HEAD, _IDLE, _BODY, _BUSY, _TUNNEL = range(5)

# Lingering close (RFC 9112 section 9.6), nginx's ``lingering_timeout`` and
# ``lingering_time``: after answering a client that is still sending, read and drop its
# bytes until it has been quiet this long, or for at most this long in all.
LINGER_QUIET = 5.0
LINGER_TIME = 30.0


_WILDCARDS = frozenset({"0.0.0.0", "::", ""})
_HTTP1 = frozenset({"1.0", "1.1"})
# Marks a request whose Transfer-Encoding did not end in chunked (see ``_rare_head``); a
# space cannot occur in a header name, so dropping "headers" of this name removes none.
_UNFRAMED_MARK = b" unframed"
_UNFRAMED = frozenset({_UNFRAMED_MARK})


def _unmapped(ip: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (``::ffff:127.0.0.1``)."""
    return ip[7:] if ip[:7].lower() == "::ffff:" and "." in ip else ip


class _Stop(Exception):
    """Raised from a callback to stop parsing once the connection is being closed."""


# A side's (special header names, captured header names, name cache, color endings).
Side = tuple[frozenset[bytes], frozenset[bytes], dict[bytes, bytes], dict[str, bytes]]


class Shared:
    """What every downstream connection of one ``Proxy`` shares."""

    def __init__(self, ctx: ProxyContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.batch = WriteBatch(loop)  # every write and close of the proxy's sockets
        self.pool = Pool(ctx, loop, self.batch)
        self.conns: set[Downstream] = set()
        self.draining = False  # answers say Connection: close
        self.accepting = False  # while draining: the listeners still serve new connections
        self.own: set[tuple[str, int]] = set()  # our listening addresses: loop detection
        self.listening: list[tuple[str, int]] = []  # the outbound sockets' (ip, port)
        self.authorities: dict[bytes, tuple[str, int]] = {}  # Host value -> (host, port)
        # Whether access lines are logged: read per response, refreshed by the proxy's
        # sweeper, so a level changed at run time applies within a second.
        self.access_log = access_log.isEnabledFor(_DEBUG)
        # The current colorer's lookups per side (inbound, outbound); see ``side``.
        self._sides_of: Colorer | None = None
        self._sides: list[Side | None] = [None, None]

    def authority(self, value: bytes) -> tuple[str, int]:
        """Parse a Host header value and remember it: apps talk to few upstreams."""
        hostport = parse_authority(value.strip(), 80)
        if len(self.authorities) >= _AUTHORITY_CACHE:
            self.authorities.clear()
        self.authorities[value] = hostport
        return hostport

    def loops_back(self, conn: UpstreamConnection) -> bool:
        """Whether a new upstream connection reached the outbound listener itself.

        Checking the Host name is not enough (``localhost``, ``[::ffff:127.0.0.1]``,
        ``127.1`` all lead here), so the connection's real peer is compared, once per
        new connection. A wildcard listener is reached at any local address, which is
        then the connection's source address too.
        """
        (local_ip, _), (peer_ip, peer_port) = conn.addrs  # type: ignore[misc]
        local_ip, peer_ip = _unmapped(local_ip), _unmapped(peer_ip)
        for ip, port in self.listening:
            if port == peer_port and (ip == peer_ip or (ip in _WILDCARDS and local_ip == peer_ip)):
                return True
        return False

    def side(self, colorer: Colorer, outbound: bool) -> Side:
        """The colorer-derived lookups of one side, made afresh when the colorer is swapped.

        Shared by every connection of the side: made per connection they cost a few
        hundred bytes each, for thousands of connections holding the same values.
        """
        if colorer is not self._sides_of:
            self._sides_of = colorer
            self._sides = [None, None]
        side = self._sides[outbound]
        if side is None:
            capture = frozenset() if outbound else colorer.inbound_capture
            special = HOP_BY_HOP | capture | {colorer.header, b"host", b"transfer-encoding"}
            if colorer.baggage_key is not None:
                special |= {b"baggage"}  # read for the color, rewritten (see ``_start``)
            # names: header name as received -> lower-case form if special, else b"" (see
            # ``Downstream.on_header``); color_ends: color -> its header line and the CRLF
            # ending the head (see ``Downstream._color_end``).
            side = self._sides[outbound] = (special, capture, {}, {})
        return side


class Request:
    """One request's state, from its first byte to its response's last byte."""

    __slots__ = (
        "baggage",
        "body_seen",
        "captured",
        "chunked",
        "code",
        "color",
        "colors",
        "complete",
        "conn",
        "connect",
        "extra",
        "head",
        "headers_done",
        "hop",
        "host",
        "host_at",
        "hsize",
        "http11",
        "keep_alive",
        "lane",
        "method",
        "pending",
        "pieces",
        "retried",
        "t0",
        "target",
        "upgrade",
        "upgrade_value",
        "url",
    )

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        # collected by the callbacks
        self.url = b""
        self.pieces: list[bytes] = [b""]  # slot 0: the request line, then name, ": ", value, CRLF
        self.hsize = 0
        self.host: bytes | None = None
        self.host_at = -1
        self.colors: list[bytes] | None = None
        self.baggage: list[bytes] | None = None  # baggage header values, when baggage is on
        self.captured: dict[bytes, list[bytes]] | None = None
        self.upgrade_value = b""
        # Header names a Connection header declared hop-by-hop, plus ``_UNFRAMED``: the
        # rare cases share one slot so a common head pays a single check for both.
        self.extra: frozenset[bytes] | None = None
        self.hop = False  # a hop-by-hop header came (see ``on_headers_complete``)
        self.method = b""
        self.http11 = True
        self.keep_alive = True
        self.chunked = False
        self.upgrade = False
        self.connect = False
        self.headers_done = False
        self.complete = False
        self.body_seen = False
        self.pending: list[bytes] | None = None  # body bytes (already framed) not yet sent
        # decided by _start and the upstream
        self.head = b""
        self.color = ""
        self.target: Key | None = None
        self.lane: Choice | None = None  # a lane chosen, until its connection is up
        self.conn: UpstreamConnection | None = None
        self.code = 0
        self.retried = False


class Downstream(asyncio.Protocol):
    """One client connection on the outbound or the inbound side."""

    __slots__ = (
        "abrupt",
        "begun",
        "capture",
        "closed",
        "closing",
        "color_ends",
        "colorer",
        "counts",
        "ctx",
        "cur",
        "direction",
        "dst",
        "early",
        "eof",
        "error_after",
        "fed",
        "flow",
        "lingering",
        "loop",
        "names",
        "outbound",
        "parser",
        "peer",
        "phase",
        "queue",
        "rx",
        "served",
        "shared",
        "since",
        "special",
        "transport",
        "trusted",
        "tunnel",
        "up",
        "write_paused",
    )

    def __init__(self, shared: Shared, direction: str) -> None:
        # global
        self.shared = shared
        self.ctx = shared.ctx
        self.loop = shared.loop
        self.direction = direction
        self.outbound = direction == "outbound"
        # Where a captured client was going (set by the front door): the upstream is
        # that address, Host untouched; None keeps the proxy's own rules (Host names it).
        self.dst: tuple[str, int] | None = None
        self.counts: DirectionCounts = shared.ctx.metrics.direction(direction)
        # per connection
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.peer = ""
        self.trusted = False
        self.closed = False  # connection_lost ran
        self.closing = False  # we decided to close; parse nothing more
        self.eof = False  # the client half-closed; close after the answers
        self.write_paused = False
        self.up: UpstreamConnection | None = None  # linked for backpressure
        self.tunnel: Tunnel | None = None
        self.early: list[bytes] | None = None  # client bytes after an upgrade request
        self.error_after: tuple[int, str] | None = None  # refusal waiting behind earlier answers
        self.lingering = 0.0  # when a lingering close began (see ``_close``); 0: not lingering
        self.abrupt = False  # close without lingering: our own timeouts, a broken response
        # colorer-derived, refreshed when the lead swaps the colorer
        self.colorer: Colorer | None = None
        # (Placeholders, never written: ``_adopt`` runs before the first request's head.)
        self.special: frozenset[bytes] = frozenset()
        self.capture: frozenset[bytes] = frozenset()
        self.names: dict[bytes, bytes] = _EMPTY_NAMES
        self.color_ends: dict[str, bytes] = _EMPTY_ENDS
        # per request
        self.queue: deque[Request] = deque()  # answered in order; [0] is being answered
        self.cur: Request | None = None  # being parsed
        self.fed = 0
        self.begun = False
        # timeouts (see sweep)
        self.rx = False
        self.served = False
        self.phase: int | None = None
        self.since = 0.0

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        if not self.outbound:
            self.trusted = self.ctx.colorer.peer_trusted(self.peer)
        self.shared.conns.add(self)
        if self.shared.draining and not self.shared.accepting:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.shared.conns.discard(self)
        # The parser holds this protocol for its callbacks: unlinked, both go now by
        # reference count, not at a full collection after a burst has come and gone.
        self.parser = None  # type: ignore[assignment]
        if self.tunnel is not None:
            self.tunnel.close()
            return
        if self.queue:
            ex = self.queue[0]
            if not ex.code and ex.color:
                ex.code = 499  # nginx's "client closed request"
                self._count(ex)
        up = self.up
        if up is not None:
            up.abandon()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        if self.closing:
            return None
        cur = self.cur
        if cur is not None and self.early is None:
            # Stopped sending mid-request: it can never complete, so say so now rather
            # than at a timeout (after the answers to the requests ahead of it).
            self.eof = True
            self._reject(400, "client closed its side before the request was complete")
            return True
        if self.queue:
            self.eof = True  # a half-closing client still gets its answers
            return True
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.up is not None:
            self.up.flow.pause(PEER_FULL)  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None:
            self.up.flow.resume(PEER_FULL)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        self.rx = True
        if self.early is not None:
            self.early.append(data)
            return
        if self.closing or self.error_after is not None:
            return
        self.begun = False
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
            return
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, DownstreamProtocolError):
                self._reject(cause.status_hint, str(cause))
            elif not isinstance(cause, _Stop):
                log.error("proxy bug while parsing a request", exc_info=cause)
                self._reject(500, "internal error in the proxy")
            return
        except HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")
            return
        cur = self.cur
        # A head arriving over several reads: httptools keeps the unfinished header
        # itself, so bound what may pile up before the callbacks can count it.
        if cur is not None and not self.begun:
            if not cur.headers_done:
                self.fed += len(data)
                if self.fed > _MAX_PENDING_HEAD:
                    self._reject(431, "request head larger than 64 KiB")
            elif cur.chunked:
                self._count_trailer(len(data))

    def _count_trailer(self, size: int) -> None:
        """Bound chunked-body reads that carry no body bytes: trailers pile up in httptools.

        ``on_body`` marks a read that moved the body on (``fed`` < 0); reads without
        any body byte (trailers, chunk extensions) add up like an unfinished head.
        """
        if self.fed < 0:
            self.fed = 0
            return
        self.fed += size
        if self.fed > _MAX_PENDING_HEAD:
            self._reject(431, "request trailers larger than 64 KiB")

    # ------------------------------------------------------------ httptools callbacks

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        if ex is None:
            # A request starts (at its first URL bytes: httptools has no cheaper first
            # callback). Begun here rather than in a helper: one Python call less each.
            if self.closing or self.error_after is not None:
                raise _Stop
            colorer = self.ctx.colorer
            if colorer is not self.colorer:
                self._adopt(colorer)
            ex = self.cur = Request(perf_counter())
            self.queue.append(ex)
            self.begun = True
            self.fed = 0
            self.phase = None
        elif ex.url:
            url = ex.url + url
        if len(url) > MAX_REQUEST_LINE:
            raise DownstreamProtocolError("request target longer than 8 KiB", 414)
        ex.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        ex: Request = self.cur  # type: ignore[assignment]
        if ex.headers_done:
            return  # a trailer; chunked bodies go upstream without trailers
        size = ex.hsize + len(name) + len(value) + 4
        if size > MAX_HEADER_BYTES:
            raise DownstreamProtocolError("request headers larger than 64 KiB", 431)
        ex.hsize = size
        # One dict lookup per header: clients repeat the same spellings, so the
        # ``lower()`` copy and the set lookup happen once per spelling. (Hot lookups
        # that nearly always hit index, not ``get()``: no method call, and a ``try``
        # costs nothing in Python 3.11 until it catches.)
        try:
            lname = self.names[name]
        except KeyError:
            lname = self._classify(name)
        if lname:
            if lname is _HOST and ex.host is None:
                # The one special header of most requests, recorded here as in
                # ``_special_header`` but without a second Python call.
                ex.host = value
                ex.host_at = len(ex.pieces) + 2
                ex.pieces.extend((name, b": ", value, b"\r\n"))
            else:
                self._special_header(ex, lname, name, value)
        else:
            ex.pieces.extend((name, b": ", value, b"\r\n"))

    def _classify(self, name: bytes) -> bytes:
        """A header name spelling not seen before: special (its lower-case form) or not (b"")."""
        lname = name.lower()
        special = lname if lname in self.special else b""
        if special == b"host" and special not in self.capture and special != self.colorer.header:  # type: ignore[union-attr]
            special = _HOST  # only Host's own handling applies: see ``on_header``
        names = self.names
        if len(names) >= _NAMES_CACHE:
            names.clear()
        names[name] = special
        return special

    def _special_header(self, ex: Request, lname: bytes, name: bytes, value: bytes) -> None:
        """Headers the proxy reads, drops or replaces; the rest pass in order untouched."""
        if lname in self.capture:
            if ex.captured is None:
                ex.captured = {}
            ex.captured.setdefault(lname, []).append(value)
        if lname == self.colorer.header:  # type: ignore[union-attr]
            if ex.colors is None:
                ex.colors = [value]
            else:
                ex.colors.append(value)
            return
        if lname == b"baggage":
            if ex.baggage is None:
                ex.baggage = [value]
            else:
                ex.baggage.append(value)
            return
        if lname in HOP_BY_HOP:
            ex.hop = True
            if lname == b"connection":
                extra = extra_hop_headers(connection_tokens(value))
                if extra:
                    ex.extra = extra if ex.extra is None else ex.extra | extra
            elif lname == b"upgrade":
                ex.upgrade_value = value
            return
        if lname == b"host":
            if ex.host is not None:
                raise DownstreamProtocolError("more than one Host header")
            ex.host = value
            ex.host_at = len(ex.pieces) + 2
        elif lname == b"transfer-encoding":
            ex.chunked = is_chunked(value)
            if not ex.chunked:  # refused at the end of the head unless a later line fixes it
                ex.extra = _UNFRAMED if ex.extra is None else ex.extra | _UNFRAMED
        ex.pieces.extend((name, b": ", value, b"\r\n"))

    def on_headers_complete(self) -> None:
        ex: Request = self.cur  # type: ignore[assignment]
        ex.headers_done = True
        parser = self.parser
        ex.method = method = parser.get_method()
        ex.keep_alive = keep = parser.should_keep_alive()
        # Without a Connection (or Proxy-Connection) header, llhttp keeps exactly the
        # HTTP/1.1 requests: its answer tells the version, and ``get_http_version`` (a
        # ``str.format`` in httptools, 3% of a request's instructions) is only asked of
        # the others, which may be 1.0 or a version this proxy refuses (505, as nginx).
        if ex.hop or not keep:
            version = parser.get_http_version()
            if version not in _HTTP1:  # llhttp also takes 0.9 and 2.0 request lines
                raise DownstreamProtocolError(f"HTTP/{version} is not served here", 505)
            ex.http11 = version == "1.1"
            if not ex.http11 and (ex.chunked or (ex.extra and _UNFRAMED_MARK in ex.extra)):
                # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing. A
                # 1.0 hop may not understand it, so where this body ends is in doubt (the
                # makings of request smuggling): refused and closed, as nginx does.
                raise DownstreamProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if method == b"CONNECT":
            ex.connect = True
        elif parser.should_upgrade():
            ex.upgrade = True
        if ex.extra:
            self._rare_head(ex)
        if self.queue[0] is ex:
            self._start(ex)

    def on_body(self, body: bytes) -> None:
        ex: Request = self.cur  # type: ignore[assignment]
        ex.body_seen = True
        self.fed = -1  # the body moved on in this read (see ``_count_trailer``)
        conn = ex.conn
        if conn is not None:
            self.shared.batch.write(conn.transport, b"".join(chunk(body)) if ex.chunked else body)  # type: ignore[arg-type]
            return
        if ex.pending is None:
            ex.pending = []
        if ex.chunked:
            ex.pending.extend(chunk(body))
        else:
            ex.pending.append(body)
        self.flow.pause(WAITING)

    def on_message_complete(self) -> None:
        ex: Request = self.cur  # type: ignore[assignment]
        self.cur = None
        ex.complete = True
        if ex.chunked:
            conn = ex.conn
            if conn is not None:
                self.shared.batch.write(conn.transport, LAST_CHUNK)  # type: ignore[arg-type]
            elif ex.pending is None:
                ex.pending = [LAST_CHUNK]
            else:
                ex.pending.append(LAST_CHUNK)
        if len(self.queue) > 1:
            self.flow.pause(QUEUED)  # pipelined: read on once the ones ahead are answered

    # ------------------------------------------------------------ decisions

    def _adopt(self, colorer: Colorer) -> None:
        """Derive the per-colorer lookups once per colorer (the lead swaps it on reload)."""
        self.colorer = colorer
        self.special, self.capture, self.names, self.color_ends = self.shared.side(
            colorer, self.outbound
        )

    def _color_end(self, color: str) -> bytes:
        """The color header line plus the end of the head, for a color not cached yet."""
        header = self.colorer.header  # type: ignore[union-attr]
        line = self.color_ends[color] = b"%s: %s\r\n\r\n" % (header, color.encode("ascii"))
        return line

    def _rare_head(self, ex: Request) -> None:
        """Rare: a Transfer-Encoding not ending in chunked, or Connection naming more
        hop-by-hop headers (removed here).

        llhttp refuses the former only after ``on_headers_complete``, when the head
        would already be on its way out on a pooled connection; RFC 9112 section 6.3
        makes it a 400.
        """
        if _UNFRAMED_MARK in ex.extra and not ex.chunked:  # type: ignore[operator]
            raise DownstreamProtocolError("request Transfer-Encoding does not end in chunked")
        ex.pieces = drop_headers(ex.pieces, ex.extra)  # type: ignore[arg-type]
        if b"host" in ex.extra:  # type: ignore[operator]
            ex.host, ex.host_at = None, -1
        ex.host_at = -1
        for i in range(1, len(ex.pieces) - 3, 4):
            if ex.pieces[i].lower() == b"host":
                ex.host_at = i + 2

    def _start(self, ex: Request) -> None:
        """The head is complete and it is this request's turn: choose upstream and color."""
        colorer: Colorer = self.colorer  # type: ignore[assignment]
        try:
            if self.outbound:
                url = ex.url
                if self.dst is not None and not ex.connect:
                    hostport = self.dst  # captured: where the app was going, as it said it
                    host, port = hostport
                    target, new_host = url, None
                elif url[:1] == b"/" and ex.host is not None:
                    # origin-form, the common case: the Host header names the upstream
                    try:
                        hostport = self.shared.authorities[ex.host]
                    except KeyError:
                        hostport = self.shared.authority(ex.host)
                    host, port = hostport
                    target, new_host = url, None
                elif ex.connect:
                    self._open_connect(ex)
                    return
                else:
                    host, port, target, new_host = outbound_target(ex.method, url, ex.host)
                    hostport = (host, port)
                if hostport in self.shared.own:
                    raise DownstreamProtocolError("request addressed to the proxy itself", 508)
                if ex.colors is None:
                    # The first hop, decided as ``Colorer.outbound`` decides it but
                    # without the call: most requests leaving a pod carry no color.
                    color, reason = colorer.pod_color, MISSING
                else:
                    color, reason = colorer.outbound(ex.colors)
            else:
                if ex.connect:
                    raise DownstreamProtocolError("CONNECT is not served on the inbound side", 405)
                app = self.ctx.app
                # captured: the app on the port the client dialled, so no Service
                # needs its targetPort changed
                host, port = app.host, app.port if self.dst is None else self.dst[1]
                target, new_host = inbound_target(ex.method, ex.url)
                if (
                    new_host is None
                    and ex.host is not None
                    and ex.host not in self.shared.authorities
                ):
                    # The app gets the Host as sent: hold it to the rules the outbound side
                    # applies (RFC 9112 section 3.2: an invalid Host is a 400); checked
                    # once per value.
                    self.shared.authority(ex.host)
                color, reason = colorer.inbound(
                    ex.colors or (), ex.captured or _EMPTY, self.trusted
                )
        except DownstreamProtocolError as exc:
            ex.color = colorer.pod_color
            self._fail(ex, exc.status_hint, str(exc))
            return
        bag = None
        if colorer.baggage_key is not None:
            color, reason, event, bag = colorer.with_baggage(
                color, reason, ex.baggage or (), self.outbound or self.trusted
            )
            if event is not None:
                self.counts.baggage[event] += 1
        if reason is not None:
            self.counts.rewrites[reason] += 1
        ex.color = color
        pieces = ex.pieces
        if new_host is not None:
            if ex.host_at >= 0:
                pieces[ex.host_at] = new_host
            else:
                pieces.extend((b"host: ", new_host, b"\r\n"))
        elif ex.host is None:  # HTTP/1.0 without Host; HTTP/1.1 upstreams require one
            if ex.http11:  # RFC 9112 section 3.2 (the outbound side refused it above)
                self._fail(ex, 400, "HTTP/1.1 request without a Host header")
                return
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            pieces.extend((b"host: ", authority.encode("idna"), b"\r\n"))
        pieces[0] = b"%s %s HTTP/1.1\r\n" % (ex.method, target)
        if ex.upgrade:
            pieces.extend((b"upgrade: ", ex.upgrade_value, b"\r\nconnection: upgrade\r\n"))
        if bag is not None:
            for value in bag:
                pieces.extend((b"baggage: ", value, b"\r\n"))
        try:
            pieces.append(self.color_ends[color])
        except KeyError:
            pieces.append(self._color_end(color))
        ex.head = b"".join(pieces)
        ex.pieces = []
        key = ex.target = (color, host, port)
        lanes = self.ctx.lanes
        if lanes is not None and self.outbound:
            # The Host stays the app's; only where the connection goes changes.
            if self.dst is None:
                choice = lanes.choose(color, host, port, reason is None)
            else:
                choice = self._captured_lane(lanes, ex.host, color, reason is None)
            if choice is not None and choice.why == LANE:
                ex.lane = choice
                key = ex.target = (color, choice.host, choice.port)
        conn = self.shared.pool.take(key)
        if conn is not None:
            conn.attach(ex, self)
        else:
            self._connect(ex, key)

    def _captured_lane(
        self, lanes: LaneRouter, host: bytes | None, color: str, carried: bool
    ) -> Choice | None:
        """Captured: ``host`` is an address the app dialled (a ClusterIP) and routes name
        services, so the route is matched on the Host header's name at the dialled port,
        and that destination is the original an empty lane falls back to. None (no lane)
        without a valid Host."""
        if host is None:
            return None
        try:
            name = self.shared.authorities[host][0]
        except KeyError:
            try:
                name = self.shared.authority(host)[0]
            except DownstreamProtocolError:
                return None
        dst: tuple[str, int] = self.dst  # type: ignore[assignment]
        return lanes.choose(color, name, dst[1], carried, dst)

    def _open_connect(self, ex: Request) -> None:
        """CONNECT host:port: a tunnel whose flow carries the pod's color."""
        host, port = parse_authority(ex.url, None)
        color = ex.color = self.colorer.pod_color  # type: ignore[union-attr]
        key = ex.target = (color, host, port)
        self._connect(ex, key)

    def _connect(self, ex: Request, key: Key) -> None:
        lanes = self.ctx.lanes
        if ex.lane is not None and lanes is not None:
            connect = functools.partial(self.shared.pool.connect, key, None)  # no tunnel
            task = self.loop.create_task(lanes.open(ex.lane, connect))
        else:
            task = self.loop.create_task(self.shared.pool.connect(key))
        task.add_done_callback(functools.partial(self._connected, ex))

    def _fall_back(self, ex: Request, lane: Choice, reason: str) -> None:
        """The lane was empty: the original destination, same color; or 503 (``fail``)."""
        lanes = self.ctx.lanes  # None: the routes went away in a reload meanwhile
        back = LaneTable.fallback(lane, reason) if lanes is None else lanes.fall_back(lane, reason)
        if back is None:
            route = lane.route.host  # type: ignore[union-attr]
            text = f"lane {lane.host} of {route} is empty ({reason}); the route says fallback: fail"
            self._fail(ex, 503, text)
            return
        if not self.queue or self.queue[0] is not ex:
            return  # nobody waits for it any more
        key = ex.target = (ex.color, back.host, back.port)
        conn = self.shared.pool.take(key)
        if conn is not None:
            conn.attach(ex, self)
        else:
            self._connect(ex, key)

    def _connected(self, ex: Request, task: asyncio.Task[UpstreamConnection]) -> None:
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():
            exc = TimeoutError()
        if exc is None:
            conn = task.result()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                self._use_new(ex, conn)
                return
            # Reset by the upstream before this callback ran: writing to it would raise
            # and leave the client waiting for ever.
            exc = ConnectionResetError("closed by the upstream as soon as it was accepted")
        if self.closing:
            return
        lane = ex.lane
        if lane is not None and isinstance(exc, EmptyLane):
            ex.lane = None
            self._fall_back(ex, lane, exc.reason)
            return
        _, host, port = ex.target  # type: ignore[misc]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if isinstance(exc, TimeoutError):
            status = 504
            text = f"upstream {where}: connect timed out after {self.ctx.timeouts.connect:g}s"
        elif isinstance(exc, ConnectionRefusedError):
            status, text = 502, f"upstream {where} refused the connection"
        elif isinstance(exc, socket.gaierror):
            status, text = 502, f"upstream {where}: cannot resolve {host}"
        else:
            status, text = 502, f"upstream {where}: cannot connect ({exc})"
        self._fail(ex, status, text)

    def _use_new(self, ex: Request, conn: UpstreamConnection) -> None:
        """A new upstream connection is up: send ``ex`` on it, or give it back."""
        if self.outbound and self.shared.loops_back(conn):
            self.shared.batch.close(conn.transport)  # type: ignore[arg-type]
            if not self.closing:
                self._fail(ex, 508, "request addressed to the proxy itself")
        elif self.closing or not self.queue or self.queue[0] is not ex:
            self.shared.pool.release(conn)  # nobody waits for it any more
        elif ex.connect:
            self.shared.batch.write(self.transport, CONNECT_ESTABLISHED)  # type: ignore[arg-type]
            ex.code = 200
            self.start_tunnel(ex, conn, b"")
        else:
            conn.attach(ex, self)

    # ------------------------------------------------------------ called by the upstream side

    def resumed_pending(self) -> None:
        """The buffered body went out with the head: reading may go on."""
        self.flow.resume(WAITING)

    def response_done(self, ex: Request) -> None:
        """``ex`` was answered in full: count it, then move the pipeline on or close."""
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        seconds = perf_counter() - ex.t0
        self.counts.request(ex.color, ex.code, seconds)
        if self.shared.access_log:
            self._log(ex, seconds)
        self.served = True
        self.phase = None
        if self.closing:
            return
        # While the listeners still accept, an answer whose head promised keep-alive
        # (sent before the drain began) leaves the connection open: the client may
        # already be sending its next request, which will be told Connection: close.
        shared = self.shared
        if not ex.keep_alive or not ex.complete or (shared.draining and not shared.accepting):
            self._close()
            return
        if queue:
            nxt = queue[0]
            if nxt.headers_done:
                self._start(nxt)
        elif self.error_after is not None:
            status, text = self.error_after
            self.shared.batch.write(self.transport, error_response(status, text))  # type: ignore[arg-type]
            self._close()
            return
        elif self.eof:
            self._close()
            return
        if self.flow.mask & QUEUED and len(queue) <= 1:
            self.flow.resume(QUEUED)

    def upstream_failed(self, ex: Request, status: int, text: str) -> None:
        self._fail(ex, status, text)

    def response_broken(self, ex: Request) -> None:
        """The upstream died mid-response: cut the client off rather than fake an ending."""
        log.info("upstream %s:%d died mid-response; closing the client", *ex.target[1:])  # type: ignore[index]
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        self._count(ex)
        # No lingering: a client still uploading must see the failure (a reset), not a
        # FIN that an HTTP/1.0 client would take for the end of a complete answer.
        self.abrupt = True
        self._close()

    def retry(self, ex: Request) -> None:
        """Send ``ex`` again on a new connection: the pooled one was already closed."""
        log.debug("retrying %s on a new connection to %s:%d", ex.method, *ex.target[1:])  # type: ignore[index]
        ex.retried = True
        if not self.closing:
            self._connect(ex, ex.target)  # type: ignore[arg-type]

    def start_tunnel(self, ex: Request, conn: UpstreamConnection, rest: bytes) -> None:
        """CONNECT established or 101 sent: from now on both sockets are a byte pipe."""
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        self._count(ex)
        tunnel = self.tunnel = conn.tunnel = Tunnel(self, conn, self.shared.batch)
        conn.ex = None
        conn.down = self
        self.up = conn
        if conn.write_paused:
            self.flow.pause(PEER_FULL)
        if self.write_paused:
            conn.flow.pause(PEER_FULL)  # type: ignore[union-attr]
        if rest:
            self.shared.batch.write(self.transport, rest)  # type: ignore[arg-type]
        early = self.early
        self.early = None
        if early:
            tunnel.from_client(b"".join(early))
        self.flow.resume(WAITING | QUEUED)
        self.phase = None

    # ------------------------------------------------------------ errors and endings

    def _upgrade_requested(self, rest: bytes) -> None:
        """httptools stopped after an Upgrade or CONNECT head: hold the client's bytes."""
        if self.closing:
            return
        self.early = [rest] if rest else []
        self.flow.pause(WAITING)

    def _fail(self, ex: Request, status: int, text: str) -> None:
        """Answer ``ex`` with the proxy's own error, or cut the connection if too late."""
        up = ex.conn
        if up is not None:
            up.abandon()
        if ex.code:
            self.response_broken(ex)
            return
        ex.code = status
        # A 5xx answers a well-formed request the upstream, a lane or the proxy failed
        # (502, 503 of ``fallback: fail``, 504, 508): once that request was read
        # completely the client may send its next one on the same connection. A 4xx
        # means the client's bytes are not to be trusted further. After a CONNECT or
        # Upgrade head the parser only passes bytes through: no further request can
        # be read, so the connection ends with the answer.
        keep = (
            status >= 500
            and ex.keep_alive
            and ex.complete
            and not (ex.connect or ex.upgrade or self.shared.draining)
        )
        ex.keep_alive = keep
        if not self.closed:
            self.shared.batch.write(self.transport, error_response(status, text, keep))  # type: ignore[arg-type]
        self.early = None
        self.response_done(ex)

    def _reject(self, status: int, text: str) -> None:
        """The client sent something unparseable or too big: 4xx and close after it."""
        ex = self.cur
        queue = self.queue
        if not queue or queue[0] is ex:
            if ex is None:
                ex = Request(perf_counter())
            ex.keep_alive = False
            ex.color = ex.color or self.ctx.colorer.pod_color
            self._fail(ex, status, text)  # closes, lingering while ``cur`` still arrives
            self.cur = None
            self._close()
            return
        self.cur = None
        # Requests ahead of it are still being answered: refuse it after them.
        if ex is None:
            ex = Request(perf_counter())  # it broke before its URL
        elif ex in queue:
            queue.remove(ex)
        self.error_after = (status, text)  # and parse nothing more
        self.flow.pause(QUEUED)
        ex.code = status
        ex.color = ex.color or self.ctx.colorer.pod_color
        self._count(ex)

    def _count(self, ex: Request) -> None:
        seconds = perf_counter() - ex.t0
        self.counts.request(ex.color, ex.code, seconds)
        if self.shared.access_log:
            self._log(ex, seconds)

    def _log(self, ex: Request, seconds: float) -> None:
        access_log.debug(
            "%s %s %s %s %s color=%s -> %d %.1fms",
            self.direction,
            self.peer,
            ex.method.decode("latin-1"),
            ex.url[:200].decode("latin-1"),
            f"{ex.target[1]}:{ex.target[2]}" if ex.target else "-",
            ex.color,
            ex.code,
            seconds * 1e3,
        )

    def _close(self) -> None:
        """Close after what was written; lingeringly if the client is still sending.

        Closing a socket with unread bytes makes the kernel send a reset, and a reset
        can throw away the answer before the client has read it (a rejected upload
        would see ``ECONNRESET`` instead of its 413). So while a request is still
        arriving (``cur``), the answer goes out with a FIN, the rest of what the client
        sends is read and dropped, and the socket closes once the client has finished,
        gone quiet for ``LINGER_QUIET`` or lingered for ``LINGER_TIME`` (the sweeper).
        """
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        if self.abrupt or self.eof or self.tunnel is not None or not self._may_send():
            self.shared.batch.close(transport)
            return
        self.lingering = self.since = self.loop.time()
        self.rx = False
        self.flow.resume(PEER_FULL | WAITING | QUEUED)  # nothing may hold the reading back
        self.shared.batch.write_eof(transport)

    def _may_send(self) -> bool:
        """Whether the client may still be sending: a request arriving, pipelined ones
        queued (read, or still in the kernel while ``QUEUED`` pauses reading), or bytes
        after a refusal that were never parsed."""
        return self.cur is not None or bool(self.queue) or self.error_after is not None

    # ------------------------------------------------------------ upkeep

    def sweep(self, now: float, timeouts: Timeouts) -> None:
        """Called by the proxy's sweeper: header-read, idle and upstream-read timeouts, no
        timer per request.

        ``phase`` is what the connection waits for; it is reset by the hot path when
        a request starts or ends, and the sweeper stamps ``since`` when it sees a
        new phase. Activity (``rx``) restarts the clock only while a body or tunnel
        flows, so a slow drip of header bytes cannot keep a connection alive.
        """
        if self.closing:
            if self.lingering:
                self._sweep_linger(now)
            return
        rx = self.rx
        self.rx = False
        cur = self.cur
        queue = self.queue
        if self.tunnel is not None:
            phase = _TUNNEL
        elif cur is not None and (not queue or queue[0] is cur):
            phase = _BODY if cur.headers_done else _HEAD
        elif queue:
            phase = _BUSY
        else:
            phase = _IDLE if self.served else _HEAD
        if phase != self.phase or (rx and phase in (_BODY, _TUNNEL)):
            self.phase = phase
            self.since = now
            return
        if phase == _BUSY:
            self._sweep_busy(now, timeouts.upstream_read)
            return
        limit = timeouts.header_read if phase == _HEAD else timeouts.idle
        if now - self.since <= limit:
            return
        # The sweeper's own timeouts close at once: lingering would let a client that
        # trickles bytes hold the connection for ``LINGER_TIME`` beyond its timeout.
        self.abrupt = True
        if phase == _HEAD and cur is not None:
            log.debug("closing %s: request head not complete within %gs", self.peer, limit)
            self._reject(408, f"request head not received within {limit:g}s")
        elif phase == _BODY and cur is not None:
            log.debug("closing %s: request body stalled for %gs", self.peer, limit)
            self._fail(cur, 408, f"request body stalled for {limit:g}s")
            self._close()
        else:
            if self.tunnel is not None:
                self.tunnel.close()
            self._close()

    def _sweep_linger(self, now: float) -> None:
        """End a lingering close once the client went quiet or lingered too long."""
        if self.rx:
            self.rx = False
            self.since = now
        if now - self.since > LINGER_QUIET or now - self.lingering > LINGER_TIME:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self.shared.batch.close(transport)

    def _sweep_busy(self, now: float, limit: float) -> None:
        """A request waits on its upstream: give up on one silent for ``limit`` seconds.

        Any bytes from the upstream restart the clock (the time between reads, as
        nginx's ``proxy_read_timeout``), and so does an upstream this side stopped
        reading because the client is slow to take the response.
        """
        ex = self.queue[0]
        up = ex.conn
        if up is None:
            return  # connecting, under the connect timeout
        if up.rx or up.flow.mask:  # type: ignore[union-attr]
            up.rx = False
            self.since = now
            return
        if now - self.since <= limit:
            return
        host, port = ex.target[1], ex.target[2]  # type: ignore[index]
        log.info("upstream %s:%d sent nothing for %gs; giving up on it", host, port, limit)
        self._fail(ex, 504, f"upstream {host}:{port} sent nothing for {limit:g}s")
