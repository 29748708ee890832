"""Upstream connections and the keep-alive pool, kept per (color, host, port).

One pooled TCP connection only ever carries requests of one color, so the
kernel can route the whole flow by that color: the pool key starts with it,
and the flow hooks hear about each connection exactly once when it opens and
once when it closes, with the same 4-tuple.

``UpstreamConnection`` parses responses with httptools' ``HttpResponseParser``;
its callbacks collect the head, rebuild it without hop-by-hop headers and push
bytes to the downstream as they come (one write per read from the upstream).
A connection answers one request at a time; when the response is complete it
goes back to the pool or is closed, and the downstream hears ``response_done``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from sidecar.errors import UpstreamProtocolError
from sidecar.proxy.exchange import (
    HOP_BY_HOP,
    IDEMPOTENT,
    LAST_CHUNK,
    MAX_HEADER_BYTES,
    connection_tokens,
    drop_headers,
    extra_hop_headers,
    is_chunked,
    status_line,
)
from sidecar.proxy.flow import PEER_FULL, FlowControl

if TYPE_CHECKING:
    from sidecar.proxy.protocol import Downstream, Request
    from sidecar.proxy.server import ProxyContext
    from sidecar.proxy.tunnel import Tunnel

log = logging.getLogger(__name__)

Key = tuple[str, str, int]  # (color, host, port)

MAX_IDLE_PER_KEY = 256  # idle connections kept per pool key; more are closed on release

# Response headers the callbacks look at; everything else is copied in order.
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"transfer-encoding", b"content-length"}
_CONNECTION_PLAIN = frozenset({b"keep-alive", b"close"})
# Header name as received -> its lower-case form if special, else b"": one dict lookup per
# header instead of a ``lower()`` copy and a set lookup (upstreams repeat the same spellings).
_RAW_NAMES: dict[bytes, bytes] = {}
_RAW_NAMES_MAX = 1024  # distinct spellings remembered before the cache starts over
# Pooled connections idle for a whole sweep give up their parser (issue 5: 10k idle flows
# must fit the memory bar); ``attach`` makes one again (about 0.3 us). Busy connections
# keep theirs, so the hot path pays nothing.
_IDLE_PIECES: list[bytes] = []  # never written: ``_new_response`` replaces it before use
_KEYS_CACHE = 4096  # distinct pool keys shared between connections before the cache starts over


class _HeadDone(Exception):
    """Raised from ``on_headers_complete`` to stop the parser after a HEAD response.

    llhttp cannot be told that a response answers HEAD, so it would wait for the
    body its Content-Length announces; the connection starts a fresh parser instead.
    """


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream, of one color."""

    __slots__ = (
        "addrs",
        "closed",
        "code",
        "down",
        "eof_ends",
        "ex",
        "extra",
        "flow",
        "got",
        "hdone",
        "head_bytes",
        "head_of",
        "hooks",
        "idle_since",
        "keep",
        "key",
        "length",
        "mode",
        "out",
        "parser",
        "pieces",
        "pool",
        "reused",
        "te",
        "transport",
        "tunnel",
        "upgrade",
        "write_paused",
    )

    def __init__(self, pool: Pool, key: Key) -> None:
        # global
        self.pool = pool
        self.key = key
        self.parser: HttpResponseParser | None = None  # made by attach, dropped when idle
        # per connection
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.addrs: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.hooks: Any = None  # the hooks object that heard flow_open, told flow_close
        self.closed = False
        self.reused = False
        self.write_paused = False
        self.idle_since = 0.0
        self.tunnel: Tunnel | None = None
        # per exchange
        self.ex: Request | None = None
        self.down: Downstream | None = None
        self.got = False  # bytes of the answer arrived
        self.out: list[bytes] = []  # bytes for the downstream, written once per read
        self.head_of: list[bytes] | None = None  # the ``pieces`` that ``head_bytes`` counts for
        self.head_bytes = 0
        # per response
        self.pieces: list[bytes] = _IDLE_PIECES
        self.code = 0
        self.hdone = False
        self.length = False
        self.te: bytes | None = None
        self.upgrade: bytes | None = None
        self.extra: frozenset[bytes] | None = None
        self.mode = 0  # 1: re-chunk the body for the client
        self.keep = False
        self.eof_ends = False

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)
        local = transport.get_extra_info("sockname")
        remote = transport.get_extra_info("peername")
        if local is None or remote is None:
            # Reset by the upstream before the transport was made: nothing to count or
            # tell the hooks; whoever connected sees a closing transport and fails.
            transport.abort()  # type: ignore[attr-defined]
            return
        # Interned: thousands of flows share a few addresses, not a string each.
        self.addrs = ((sys.intern(local[0]), local[1]), (sys.intern(remote[0]), remote[1]))
        self.pool.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self.tunnel is not None:
            self.tunnel.close()
            return
        ex = self.ex
        if ex is not None:
            self._lost_during(ex)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()
        return None  # closes; connection_lost finishes or fails the exchange

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.down is not None:
            self.down.flow.pause(PEER_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.down is not None:
            self.down.flow.resume(PEER_FULL)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        if self.ex is None:
            log.debug("upstream %s:%d sent bytes while idle; closing it", *self.key[1:])
            self.transport.close()  # type: ignore[union-attr]
            return
        self.got = True
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
            return
        except HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadDone):
                self.parser = HttpResponseParser(self)
                # Anything after the head would be a body HEAD must not have.
                self._finish(self.keep and data.endswith(b"\r\n\r\n"))
            else:
                self._bad_response(str(exc.__context__ or exc))
            return
        except HttpParserError as exc:
            self._bad_response(str(exc))
            return
        if self.out:
            self._flush()
        elif not self.hdone and self.ex is not None:
            self._count_head(len(data))

    def _count_head(self, size: int) -> None:
        """Bound a response head arriving over several reads, as the downstream does.

        httptools keeps an unfinished header itself, so without this an upstream could
        make it grow for ever. The count restarts with each head: ``_new_response``
        makes a new ``pieces`` list, so no per-response reset is needed on the hot path.
        """
        if self.head_of is not self.pieces:
            self.head_of = self.pieces
            self.head_bytes = 0
        self.head_bytes += size
        if self.head_bytes > MAX_HEADER_BYTES:
            self._bad_response("response head larger than 64 KiB")

    # ------------------------------------------------------------ exchange

    def attach(self, ex: Request, down: Downstream) -> None:
        """Send ``ex`` (head and any body buffered so far) and answer it to ``down``."""
        self.ex = ex
        self.down = down
        self.got = False
        if self.parser is None:
            self.parser = HttpResponseParser(self)
        self._new_response()
        ex.conn = self
        down.up = self
        if down.write_paused:
            self.flow.pause(PEER_FULL)  # type: ignore[union-attr]
        if self.write_paused:
            down.flow.pause(PEER_FULL)
        pending = ex.pending
        if pending:
            ex.pending = None
            pending.insert(0, ex.head)
            self.transport.write(b"".join(pending))  # type: ignore[union-attr]
            down.resumed_pending()
        else:
            self.transport.write(ex.head)  # type: ignore[union-attr]

    def detach(self) -> None:
        """Unlink from the exchange and undo any backpressure it caused either way."""
        down = self.down
        if down is not None:
            if down.up is self:
                down.up = None
            if self.write_paused:
                down.flow.resume(PEER_FULL)
        if self.flow.mask:  # type: ignore[union-attr]
            self.flow.resume(PEER_FULL)  # type: ignore[union-attr]
        ex = self.ex
        if ex is not None and ex.conn is self:
            ex.conn = None
        self.ex = None
        self.down = None

    def abandon(self) -> None:
        """The downstream is gone or gave up mid-exchange: this connection cannot be reused."""
        self.detach()
        if self.tunnel is None and self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ httptools callbacks

    def _new_response(self) -> None:
        """Reset the per-response state (on attach, and after an interim 1xx head).

        Done here rather than in an ``on_message_begin`` callback: one Python call
        less per response on the hot path.
        """
        self.pieces = [b""]
        self.hdone = False
        self.length = False
        self.te = None
        self.upgrade = None
        self.extra = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.hdone:
            return  # a trailer; re-chunked bodies end without trailers
        lname = _RAW_NAMES.get(name)
        if lname is None:
            lname = _special_name(name)
        if lname:
            if lname == b"content-length":
                self.length = True
                self.pieces.extend((name, b": ", value, b"\r\n"))
            elif lname == b"transfer-encoding":
                self.te = value
            elif lname == b"upgrade":
                self.upgrade = value
            elif lname == b"connection" and value.lower() not in _CONNECTION_PLAIN:
                extra = extra_hop_headers(connection_tokens(value))
                if extra:
                    self.extra = extra if self.extra is None else self.extra | extra
        else:
            self.pieces.extend((name, b": ", value, b"\r\n"))

    def on_headers_complete(self) -> None:
        ex: Request = self.ex  # type: ignore[assignment]
        if ex is None or self.hdone:
            raise UpstreamProtocolError("response without a request")
        self.hdone = True
        code = self.code = self.parser.get_status_code()  # type: ignore[union-attr]
        pieces = self.pieces
        if self.extra:
            pieces = drop_headers(pieces, self.extra)
        pieces[0] = status_line(code)
        if code < 200:
            if code == 101:
                if not ex.upgrade:
                    raise UpstreamProtocolError("101 Switching Protocols to a plain request")
                pieces.append(b"upgrade: %s\r\nconnection: upgrade\r\n\r\n" % (self.upgrade or b""))
                self.out.append(b"".join(pieces))
            elif ex.http11:  # interim (100 Continue, 103); HTTP/1.0 clients never see them
                pieces.append(b"\r\n")
                self.out.append(b"".join(pieces))
            self._new_response()  # the final response follows on the same parser
            return
        down: Downstream = self.down  # type: ignore[assignment]
        keep_down = ex.keep_alive and ex.complete and not ex.upgrade and not down.shared.draining
        self.keep = self.parser.should_keep_alive()  # type: ignore[union-attr]
        self.eof_ends = False
        self.mode = 0
        te = self.te
        if code in (204, 304) or ex.method == b"HEAD":
            if te is not None:
                pieces.extend((b"transfer-encoding: ", te, b"\r\n"))
        elif te is not None and is_chunked(te):
            if ex.http11:
                pieces.extend((b"transfer-encoding: ", te, b"\r\n"))
                self.mode = 1
            else:
                keep_down = False  # an HTTP/1.0 client reads the body up to the close
        elif not self.length:
            # Close-delimited: complete when the upstream closes, never reusable. A
            # coding other than chunked (``te``, rare) stays named, or the client would
            # take coded bytes for the content.
            self.eof_ends = True
            self.keep = False
            if ex.http11:
                if te is None:
                    pieces.append(b"transfer-encoding: chunked\r\n")
                else:
                    pieces.extend((b"transfer-encoding: ", te, b", chunked\r\n"))
                self.mode = 1
            else:
                if te is not None:
                    pieces.extend((b"transfer-encoding: ", te, b"\r\n"))
                keep_down = False
        if not keep_down:
            pieces.append(b"connection: close\r\n\r\n")
            ex.keep_alive = False
        elif not ex.http11:
            pieces.append(b"connection: keep-alive\r\n\r\n")
        else:
            pieces.append(b"\r\n")
        self.out.append(b"".join(pieces))
        ex.code = code
        if ex.method == b"HEAD" and code not in (204, 304):
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        if self.mode:
            self.out.extend((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.code < 200:
            return  # an interim answer, or 101 (the upgrade exception follows)
        if self.mode:
            self.out.append(LAST_CHUNK)
        self._finish(self.keep)

    # ------------------------------------------------------------ endings

    def _flush(self) -> None:
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        down = self.down
        if down is not None and not down.closed:
            down.transport.write(data)  # type: ignore[union-attr]

    def _finish(self, reusable: bool) -> None:
        ex: Request = self.ex  # type: ignore[assignment]
        down: Downstream = self.down  # type: ignore[assignment]
        out = self.out
        if out:
            if not down.closed:
                down.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]
            out.clear()
        self.detach()
        if reusable and ex.complete and not self.closed:
            # Pooled only after the downstream moved on: a pipelined request it starts
            # now must not get this connection while llhttp may still be parsing bytes
            # of this read that follow the response (an upstream sending too much).
            down.response_done(ex)
            self.pool.release(self)
            return
        if self.transport is not None:
            self.transport.close()
        down.response_done(ex)

    def _upgraded(self, rest: bytes) -> None:
        """101 Switching Protocols went to the client: both sockets become a byte pipe."""
        ex: Request = self.ex  # type: ignore[assignment]
        down: Downstream = self.down  # type: ignore[assignment]
        if self.out:
            self._flush()
        ex.code = 101
        self.ex = None
        ex.conn = None
        down.start_tunnel(ex, self, rest)

    def _bad_response(self, why: str) -> None:
        ex = self.ex
        down = self.down
        self.detach()
        self.out.clear()
        self.transport.close()  # type: ignore[union-attr]
        if ex is None or down is None:
            return
        if ex.code:
            down.response_broken(ex)
        else:
            host, port = self.key[1], self.key[2]
            down.upstream_failed(ex, 502, f"upstream {host}:{port} sent an invalid response: {why}")

    def _lost_during(self, ex: Request) -> None:
        down: Downstream = self.down  # type: ignore[assignment]
        host, port = self.key[1], self.key[2]
        if not self.got:
            self.detach()
            if (
                self.reused
                and not ex.retried
                and ex.complete
                and not ex.body_seen
                and ex.method in IDEMPOTENT
            ):
                # The pooled connection was closed by the upstream just as we used it.
                down.retry(ex)
            else:
                down.upstream_failed(
                    ex, 502, f"upstream {host}:{port} closed the connection without answering"
                )
        elif ex.code == 0:
            self.detach()
            down.upstream_failed(ex, 502, f"upstream {host}:{port} closed mid response head")
        elif self.eof_ends:
            if self.mode:
                self.out.append(LAST_CHUNK)
            self._finish(False)
        else:
            self.detach()
            down.response_broken(ex)


class Pool:
    """Idle keep-alive connections per (color, host, port), and every open one."""

    def __init__(self, ctx: ProxyContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.idle: dict[Key, list[UpstreamConnection]] = {}
        self.open: set[UpstreamConnection] = set()
        self.now = loop.time()  # advanced by the proxy's sweeper; stamps idle connections
        self.closed = False
        # 4-tuples told to the hooks before their connect finished -> (4-tuple, those hooks);
        # the connection adopts the tuple itself, so the hooks' records share it.
        self._registered: dict[tuple[tuple[str, int], tuple[str, int]], Any] = {}
        self._keys: dict[Key, Key] = {}  # one key tuple per upstream, shared by its connections

    def take(self, key: Key) -> UpstreamConnection | None:
        """The most recently used idle connection for ``key`` (LIFO keeps few warm), or None."""
        stack = self.idle.get(key)
        while stack:
            conn = stack.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed:
            conn.transport.close()  # type: ignore[union-attr]
            return
        stack = self.idle.get(conn.key)
        if stack is None:
            stack = self.idle[conn.key] = []
        if len(stack) >= MAX_IDLE_PER_KEY:
            conn.transport.close()  # type: ignore[union-attr]
            return
        conn.idle_since = self.now
        conn.pieces = _IDLE_PIECES
        stack.append(conn)

    async def connect(self, key: Key) -> UpstreamConnection:
        """A new connection for ``key``; raises TimeoutError or OSError."""
        _, host, port = key
        key = self._keys.setdefault(key, key)
        if len(self._keys) > _KEYS_CACHE:
            self._keys.clear()
        if self.ctx.hooks is not None:
            return await asyncio.wait_for(self._connect_colored(key), self.ctx.timeouts.connect)
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(lambda: UpstreamConnection(self, key), host, port),
            self.ctx.timeouts.connect,
        )
        return conn

    async def _connect_colored(self, key: Key) -> UpstreamConnection:
        """Register the flow before its SYN leaves, then connect.

        A router routes each packet by its mark, so an unmarked handshake would
        reach the main table's host and the marked rest of the flow another one.
        The 4-tuple is known before connect() only when we bind first, to the
        source address the kernel would pick anyway. ``opened`` then only adopts
        the registration (each flow hears ``flow_open`` exactly once) and ``lost``
        removes it; a connect that fails is unregistered here.
        """
        color, host, port = key
        hooks = self.ctx.hooks
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {host}")
        for family, _, _, _, addr in infos:
            sock = socket.socket(family, socket.SOCK_STREAM)
            registered = None
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind((_source_address(family, addr), 0))
                local = sock.getsockname()[:2]
                registered = ((sys.intern(local[0]), local[1]), (sys.intern(addr[0]), addr[1]))
                self._registered[registered] = (registered, hooks)
                _call_hook(hooks.flow_open, color, *registered)
                await self.loop.sock_connect(sock, addr)
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, key), sock=sock
                )
                if conn.addrs is None:  # reset between connect and the transport
                    raise ConnectionResetError("closed by the upstream as soon as it was accepted")
                return conn
            except BaseException as exc:
                sock.close()
                if registered is not None and self._registered.pop(registered, None):
                    _call_hook(hooks.flow_close, color, *registered)
                if not isinstance(exc, OSError):
                    raise
                error = exc
        raise error

    # ------------------------------------------------------------ flow bookkeeping

    def opened(self, conn: UpstreamConnection) -> None:
        self.open.add(conn)
        color = conn.key[0]
        self.ctx.metrics.flow_opened(color)
        found = self._registered.pop(conn.addrs, None)  # type: ignore[arg-type]
        if found is not None:
            conn.addrs, conn.hooks = found  # registered before the SYN by _connect_colored
            return
        hooks = self.ctx.hooks
        if hooks is not None:
            _call_hook(hooks.flow_open, color, *conn.addrs)  # type: ignore[misc]
            conn.hooks = hooks  # told even if it failed: it may have half-recorded the flow

    def lost(self, conn: UpstreamConnection) -> None:
        if conn not in self.open:
            return
        self.open.discard(conn)
        stack = self.idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)
        color = conn.key[0]
        self.ctx.metrics.flow_closed(color)
        hooks = conn.hooks
        if hooks is not None:
            conn.hooks = None
            _call_hook(hooks.flow_close, color, *conn.addrs)  # type: ignore[misc]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for conn in self.open:
            out[conn.key[0]] = out.get(conn.key[0], 0) + 1
        return out

    # ------------------------------------------------------------ upkeep

    def sweep(self, now: float, idle_timeout: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (oldest sit at the bottom).

        Connections already idle at the previous sweep drop their parser: they are the
        long tail of a large pool, not the few that serve the next request.
        """
        before, self.now = self.now, now
        for stack in self.idle.values():
            while stack and now - stack[0].idle_since > idle_timeout:
                stack.pop(0).transport.close()  # type: ignore[union-attr]
            for conn in stack:
                if conn.idle_since >= before:
                    break  # newer ones sit above
                conn.parser = None

    def close_idle(self) -> None:
        for stack in self.idle.values():
            while stack:
                stack.pop().transport.close()  # type: ignore[union-attr]

    def close_all(self) -> None:
        self.closed = True
        self.close_idle()
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()


def _special_name(name: bytes) -> bytes:
    """Classify a response header name spelling not seen before, and remember it."""
    lname = name.lower()
    special = lname if lname in _RESPONSE_SPECIAL else b""
    if len(_RAW_NAMES) >= _RAW_NAMES_MAX:
        _RAW_NAMES.clear()
    _RAW_NAMES[name] = special
    return special


def _call_hook(method: Any, color: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
    """A raising hook is logged, never allowed to fail a request."""
    try:
        method(color, local, remote)
    except Exception:
        log.exception("%s hook failed for %s %s -> %s", method.__name__, color, local, remote)


def _source_address(family: int, addr: tuple) -> str:
    """The source address the kernel picks to reach ``addr`` (a UDP connect sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)
        return probe.getsockname()[0]
