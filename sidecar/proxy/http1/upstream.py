"""The response relay: one upstream TCP connection of one color, answering one request at a time.

``UpstreamConnection`` parses responses with httptools' ``HttpResponseParser``
without a per-header callback: once llhttp has accepted a head, the raw head
is rebuilt without hop-by-hop headers in one pass (``response_fields``), and
bytes go to the downstream as they come (one write per read from the upstream).
A connection answers one request at a time; when the response is complete it
goes back to the pool or is closed, and the downstream hears ``response_done``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from sidecar.errors import UpstreamProtocolError
from sidecar.proxy.flow import PEER_FULL, FlowControl
from sidecar.proxy.http1.exchange import (
    IDEMPOTENT,
    KEEP_ALIVE_CUT,
    KEEP_ALIVE_LAST,
    LAST_CHUNK,
    MAX_HEADER_BYTES,
    STATUS_LINES,
    has_content_length,
    is_chunked,
    may_have_response_field,
    response_fields,
    status_line,
)

if TYPE_CHECKING:
    from sidecar.proxy.context import Key
    from sidecar.proxy.http1.downstream import Downstream, Request
    from sidecar.proxy.opaque import Tunnel
    from sidecar.proxy.pool import Pool

log = logging.getLogger(__name__)


_KEEP_ALIVE_TAIL = -len(KEEP_ALIVE_LAST)  # ``lines[_KEEP_ALIVE_TAIL:]``: no endswith() call


class _HeadDone(Exception):
    """Raised from ``on_headers_complete`` to stop the parser after a HEAD response.

    llhttp cannot be told that a response answers HEAD, so it would wait for the
    body its Content-Length announces; the connection starts a fresh parser instead.
    """


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream, of one color."""

    __slots__ = (
        "addrs",
        "batch",
        "closed",
        "code",
        "data",
        "down",
        "eof_ends",
        "ex",
        "flow",
        "got",
        "hdone",
        "head_at",
        "held",
        "hooks",
        "idle_since",
        "keep",
        "key",
        "mode",
        "out",
        "parked",
        "parser",
        "pool",
        "reused",
        "rx",
        "transport",
        "tunnel",
        "write_paused",
    )

    def __init__(self, pool: Pool, key: Key) -> None:
        # global
        self.pool = pool
        self.batch = pool.batch
        self.key = key
        self.parser: HttpResponseParser | None = None  # made by attach, dropped when parked
        # per connection
        self.transport: asyncio.Transport | None = None
        self.parked: int | None = None  # a duplicate of the socket's fd while it parks
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
        self.rx = False  # bytes arrived since the downstream's sweep last looked
        self.out: list[bytes] = []  # bytes for the downstream, written once per read
        # The read being parsed, and the bytes of a head that began in earlier reads: the
        # head is taken from them when llhttp has accepted it (``on_headers_complete``).
        self.data = b""
        self.held = b""
        self.head_at = 0  # where the head starts in ``held + data`` (after an interim 1xx)
        # per response
        self.code = 0
        self.hdone = False
        self.mode = 0  # 1: re-chunk the body for the client
        self.keep = False
        self.eof_ends = False

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)
        if self.addrs is not None:
            return  # revived from the parked tier: the same flow, counted and told already
        local = transport.get_extra_info("sockname")
        remote = transport.get_extra_info("peername")
        if local is None or remote is None:
            # Reset by the upstream before the transport was made: nothing to count or
            # tell the hooks; whoever connected sees a closing transport and fails.
            transport.abort()  # type: ignore[attr-defined]
            return
        # Interned: thousands of flows share a few addresses, not a string (or a tuple) each.
        self.addrs = ((sys.intern(local[0]), local[1]), self.pool.remote(remote))
        self.pool.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parked is not None:
            self.pool.settle(self)  # our own close, to park the socket it leaves open
            return
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
            self.batch.close(self.transport)  # type: ignore[arg-type]
            return
        self.got = self.rx = True
        self.data = data
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
        if not self.hdone and self.ex is not None:
            self._hold(data)
        if self.out:
            self._flush()

    def _hold(self, data: bytes) -> None:
        """Keep the start of a head that continues in the next read, up to the same bound
        as a request head's; from the end of an interim 1xx head when one came first."""
        held = self.held + data
        if self.head_at:
            held = held[self.head_at :]
            self.head_at = 0
        self.held = held
        if len(held) > MAX_HEADER_BYTES:
            self._bad_response("response head larger than 64 KiB")

    # ------------------------------------------------------------ exchange

    def attach(self, ex: Request, down: Downstream) -> None:
        """Send ``ex`` (head and any body buffered so far) and answer it to ``down``."""
        self.ex = ex
        self.down = down
        self.got = False
        if self.parser is None:
            self.parser = HttpResponseParser(self)
        self.hdone = False  # ``held`` and ``head_at`` were reset by the last final head
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
            self.batch.write(self.transport, b"".join(pending))  # type: ignore[arg-type]
            down.resumed_pending()
        else:
            self.batch.write(self.transport, ex.head)  # type: ignore[arg-type]

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
            self.batch.close(self.transport)

    # ------------------------------------------------------------ httptools callbacks

    # Trailers are not collected: without an ``on_header`` callback llhttp reads past
    # them, and re-chunked bodies end without trailers.

    def on_headers_complete(self) -> None:
        ex: Request = self.ex  # type: ignore[assignment]
        if ex is None or self.hdone:
            raise UpstreamProtocolError("response without a request")
        self.hdone = True
        code = self.code = self.parser.get_status_code()  # type: ignore[union-attr]
        # llhttp has accepted the head, so it is in these bytes with CRLF line ends.
        held = self.held
        raw = held + self.data if held else self.data
        start = self.head_at
        end = raw.find(b"\r\n\r\n", start) + 2
        lines = raw[raw.find(b"\r\n", start) : end]
        if lines[_KEEP_ALIVE_TAIL:] == KEEP_ALIVE_LAST:
            lines = lines[:KEEP_ALIVE_CUT]
        te = upgrade = None
        if may_have_response_field(lines.lower()) is not None:
            lines, te, upgrade = response_fields(lines)
        try:
            line = STATUS_LINES[code]
        except KeyError:
            line = status_line(code)
        if code < 200:
            if code == 101:
                if not ex.upgrade:
                    raise UpstreamProtocolError("101 Switching Protocols to a plain request")
                self.out.append(
                    b"%s%supgrade: %s\r\nconnection: upgrade\r\n\r\n"
                    % (line, lines, upgrade or b"")
                )
            elif ex.http11:  # interim (100 Continue, 103); HTTP/1.0 clients never see them
                self.out.append(b"%s%s\r\n" % (line, lines))
            self.hdone = False  # the final response follows on the same parser
            self.head_at = end + 2
            return
        if held or start:
            self.held = b""
            self.head_at = 0
        ex.code = code
        keep = self.keep = self.parser.should_keep_alive()  # type: ignore[union-attr]
        if te is not None and keep and self.parser.get_http_version() == "1.0":  # type: ignore[union-attr]
            # RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
            # framing, so whatever llhttp made of it, the connection is not reused.
            keep = self.keep = False
        self.eof_ends = False
        self.mode = 0
        down: Downstream = self.down  # type: ignore[assignment]
        if not (ex.keep_alive and ex.complete and not ex.upgrade and not down.shared.draining):
            ex.keep_alive = False
        if te is None and keep and ex.keep_alive and ex.http11:
            # The common answer: framed by its Content-Length (llhttp keeps a connection
            # only when it knows where the body ends) or bodiless, and passed on as it
            # came to a client that keeps its connection.
            self.out.append(b"%s%s\r\n" % (line, lines))
        else:
            fields = [line, lines]
            if te is not None or not keep:
                self._framing(fields, ex, code, te)
            if not ex.keep_alive:
                fields.append(b"connection: close\r\n\r\n")
            elif not ex.http11:
                fields.append(b"connection: keep-alive\r\n\r\n")
            else:
                fields.append(b"\r\n")
            self.out.append(b"".join(fields))
        if ex.method == b"HEAD" and code not in (204, 304):
            raise _HeadDone

    def _framing(self, fields: list[bytes], ex: Request, code: int, te: bytes | None) -> None:
        """Restate the framing of an answer that is not a plain Content-Length one.

        Appends to ``fields`` (the status line and the forwarded lines), sets the body
        mode, and refuses keep-alive to a client that only the close can tell where
        the body ends.
        """
        if code in (204, 304) or ex.method == b"HEAD":
            # Bodiless. RFC 9112 section 6.1: never Transfer-Encoding on a 204, nor to an
            # HTTP/1.0 client; on a HEAD or 304 answer to HTTP/1.1 it may say what a GET
            # would have been coded with.
            if te is not None and code != 204 and ex.http11:
                fields.extend((b"transfer-encoding: ", te, b"\r\n"))
        elif te is not None and is_chunked(te):
            if ex.http11:
                fields.extend((b"transfer-encoding: ", te, b"\r\n"))
                self.mode = 1
            else:
                ex.keep_alive = False  # an HTTP/1.0 client reads the body up to the close
        elif not (self.keep or has_content_length(fields[1])):
            # Close-delimited: complete when the upstream closes, never reusable. A coding
            # other than chunked (``te``, rare) stays named to an HTTP/1.1 client, or it
            # would take coded bytes for the content.
            self.eof_ends = True
            self.keep = False
            if ex.http11:
                if te is None:
                    fields.append(b"transfer-encoding: chunked\r\n")
                else:
                    fields.extend((b"transfer-encoding: ", te, b", chunked\r\n"))
                self.mode = 1
            elif te is not None:
                # A coding other than chunked cannot be named to an HTTP/1.0 client (RFC
                # 9112 section 6.1), and without its name the coded bytes would pass for
                # the content: refused (502), as HAProxy does, rather than corrupted.
                ex.code = 0
                raise UpstreamProtocolError(
                    "Transfer-Encoding other than chunked cannot reach an HTTP/1.0 client"
                )
            else:
                ex.keep_alive = False

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
            self.batch.write(down.transport, data)  # type: ignore[arg-type]

    def _finish(self, reusable: bool) -> None:
        ex: Request = self.ex  # type: ignore[assignment]
        down: Downstream = self.down  # type: ignore[assignment]
        out = self.out
        if out:
            if not down.closed:
                self.batch.write(down.transport, out[0] if len(out) == 1 else b"".join(out))  # type: ignore[arg-type]
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
            self.batch.close(self.transport)
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
        self.batch.close(self.transport)  # type: ignore[arg-type]
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
