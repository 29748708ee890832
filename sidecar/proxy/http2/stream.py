"""``Relay``: one client stream and the upstream stream it is proxied to.

DATA is relayed with flow control tied to the other leg: bytes received on one
side are consumed (their WINDOW_UPDATE sent) only while the other side's send
queue for the stream is at most ``HIGH_WATER``; beyond it, they are owed and
consumed when that queue drains to ``LOW_WATER`` (``drained``). So a slow reader
stops its writer, and what one stream can make the proxy hold is bounded by
its receive window plus ``HIGH_WATER``.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any

from sidecar.proxy.http2 import headers as h
from sidecar.proxy.http2.binding import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    buffered,
    new_stream,
    notify_below,
)

if TYPE_CHECKING:
    from sidecar.proxy.http2.connection import Downstream, Upstream
    from sidecar.proxy.lanes import Choice

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
REPLAY_LIMIT = 64 * 1024  # request body kept for one retry after an upstream GOAWAY


class Relay:
    """Client stream ``sid`` on ``down`` <-> stream ``up_sid`` on ``up``."""

    __slots__ = (
        "block",
        "color",
        "done",
        "down",
        "down_q",
        "grpc",
        "grpc_status",
        "grpc_timeout",
        "key",
        "lane",
        "owed_down",
        "owed_up",
        "pending",
        "replay",
        "replay_size",
        "req_end",
        "req_trailers",
        "resp_end",
        "retried",
        "sid",
        "status",
        "t0",
        "up",
        "up_q",
        "up_sid",
    )

    def __init__(self, down: Downstream, sid: int, t0: float) -> None:
        self.down = down
        self.sid = sid
        self.t0 = t0
        self.color = ""
        self.key: tuple[str, str, int] = ("", "", 0)
        self.lane: Choice | None = None  # the lane chosen; None: none, or it was empty
        self.grpc = False
        self.grpc_timeout: float | None = None  # the call's own deadline, seconds
        self.block = b""  # the request head as forwarded (colored)
        self.up: Upstream | None = None
        self.up_sid = 0
        self.up_q: Any = None  # request DATA queue on the upstream session
        self.down_q: Any = None  # response DATA queue on the client session
        self.pending: list[bytes] = []  # request DATA before the upstream stream exists
        self.owed_down = 0  # request bytes received, not consumed yet
        self.owed_up = 0  # response bytes received, not consumed yet
        self.req_end = False
        self.req_trailers: bytes | None = None
        self.resp_end = False
        self.status = 0
        self.grpc_status: str | None = None
        self.retried = False
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.done = False  # the client stream is closed

    # ------------------------------------------------------------ client -> upstream

    def start(self, up: Upstream) -> None:
        """Open the upstream stream (the connection is ready and has room)."""
        if self.done or self.status:  # closed, or answered by the proxy while waiting
            return
        bodiless = self.req_end and not self.pending and self.req_trailers is None
        q = None if bodiless else new_stream()
        sid = up.session.request(self.block, q)
        if sid < 0:
            self.fail(h.UNAVAILABLE)
            return
        self.up, self.up_sid, self.up_q = up, sid, q
        up.streams[sid] = self
        if q is not None:
            session = up.session
            for data in self.pending:
                session.write(q, data)
            self.pending = []
            if self.req_end:
                session.end(q, self.req_trailers)
            self._settle_down()
        up.mark()

    def request_data(self, data: bytes) -> None:
        n = len(data)
        if self.replay is not None:
            self.replay_size += n
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay.append(data)
        q = self.up_q
        if q is None or self.up is None:
            if self.status:  # answered already: the body goes nowhere
                self.down.session.consume(self.sid, n)
                self.down.mark()
            else:
                self.pending.append(data)
                self.owed_down += n
            return
        self.owed_down += n
        self.up.session.write(q, data)
        self.up.mark()
        self._settle_down()

    def request_end(self, trailers: bytes | None) -> None:
        self.req_end = True
        self.req_trailers = trailers
        if self.up_q is not None and self.up is not None:
            self.up.session.end(self.up_q, trailers)
            self.up.mark()

    def request_drained(self) -> None:
        self._settle_down()

    def _settle_down(self) -> None:
        """Consume what the client sent once the upstream queue has room for more."""
        if not self.owed_down:
            return
        if buffered(self.up_q) <= HIGH_WATER:
            self.down.session.consume(self.sid, self.owed_down)
            self.owed_down = 0
            self.down.mark()
        else:
            notify_below(self.up_q, LOW_WATER)

    # ------------------------------------------------------------ upstream -> client

    def response_head(self, block: bytes, end: bool) -> None:
        if self.done:
            return
        status = h.status_of(block)
        down = self.down
        if status < 200:  # 1xx: passed on, the final head follows
            down.session.headers(self.sid, block, False)
            down.mark()
            return
        self.status = status
        self.replay = None
        if end:
            self.resp_end = True
            if self.grpc:
                self.grpc_status = h.grpc_status(h.fields(block), status)
            down.session.response(self.sid, block, None)
        else:
            self.down_q = new_stream()
            down.session.response(self.sid, block, self.down_q)
        down.mark()

    def response_data(self, data: bytes) -> None:
        up = self.up
        n = len(data)
        if self.done or self.down_q is None:
            if up is not None:
                up.session.consume(self.up_sid, n)
                up.mark()
            return
        self.owed_up += n
        self.down.session.write(self.down_q, data)
        self.down.mark()
        self._settle_up()

    def response_end(self, trailers: bytes | None) -> None:
        if self.done or self.resp_end:
            return
        self.resp_end = True
        if self.grpc:
            self.grpc_status = h.grpc_status(h.fields(trailers or b""), self.status)
        if self.down_q is not None:
            self.down.session.end(self.down_q, trailers)
            self.down.mark()

    def response_drained(self) -> None:
        self._settle_up()

    def _settle_up(self) -> None:
        up = self.up
        if not self.owed_up or up is None:
            return
        if buffered(self.down_q) <= HIGH_WATER:
            up.session.consume(self.up_sid, self.owed_up)
            self.owed_up = 0
            up.mark()
        else:
            notify_below(self.down_q, LOW_WATER)

    def answer_limit(self, upstream_read: float) -> float | None:
        """Seconds the upstream may take to start answering, or None for no limit.

        HTTP: ``timeouts.upstream_read``. gRPC: a call without a deadline may wait for its
        first message as long as it likes (a watch stream); one with a deadline gets at
        most ``upstream_read``, and at most its deadline.
        """
        if not self.grpc:
            return upstream_read
        if self.grpc_timeout is None:
            return None
        return min(self.grpc_timeout, upstream_read)

    # ------------------------------------------------------------ endings

    def up_closed(self, code: int) -> None:
        """The upstream stream is gone (answered, reset, refused, or its connection lost)."""
        up = self.up
        self.up = None
        self.up_q = None
        self.owed_up = 0
        if self.done:
            return
        if not self.status:
            if code == REFUSED_STREAM and not self.retried and self.replay is not None:
                # Not processed upstream (GOAWAY or refused): safe to send once more.
                self.retried = True
                self.pending = self.replay
                self.replay = None
                if up is not None:
                    up.pool.assign(self)
                return
            self.fail(h.UNAVAILABLE)
        elif not self.resp_end:
            self.down.session.reset(self.sid, code if code != NO_ERROR else INTERNAL_ERROR)
            self.down.mark()

    def down_closed(self, code: int) -> None:
        """The client stream is closed: reset what is left upstream and count the request."""
        if self.done:
            return
        self.done = True
        up = self.up
        if up is not None:
            if self.up_sid in up.streams:
                up.session.reset(self.up_sid, CANCEL)
                up.mark()
        elif self.status == 0:
            self.down.side.pool.forget(self)
        if self.owed_down:
            self.down.session.consume(self.sid, self.owed_down)
            self.owed_down = 0
        if not self.color:
            return  # refused before it had a color: not a request
        status = self.status or 499  # nginx's "client closed request"
        seconds = perf_counter() - self.t0
        self.down.counts.request(self.color, status, seconds)
        if self.grpc:
            grpc = self.grpc_status
            if grpc is None or (code != NO_ERROR and not self.resp_end):
                grpc = h.GRPC_CANCELLED
            self.down.side.ctx.metrics.grpc_request(self.down.direction, self.color, grpc)

    def fail(self, kind: str) -> None:
        """Answer the client ourselves (the upstream did not, or could not)."""
        if self.done or self.status:
            return
        status, grpc_status, head, body = h.failure(kind, self.grpc)
        self.status = status
        self.resp_end = True
        self.replay = None
        down = self.down
        if self.grpc:
            self.grpc_status = grpc_status
            down.session.response(self.sid, head, None)
        else:
            q = self.down_q = new_stream()
            down.session.response(self.sid, head, q)
            down.session.write(q, body)
            down.session.end(q, None)
        if self.owed_down:
            down.session.consume(self.sid, self.owed_down)
            self.owed_down = 0
        self.pending = []
        down.mark()
