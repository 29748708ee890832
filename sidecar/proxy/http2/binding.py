"""``Session``: one nghttp2 session (client or server) over the compiled ``_nghttp2`` module.

Bytes go in with ``recv`` and come out with ``send``; what nghttp2 parsed comes
back through the owner's three methods (the ``Peer`` protocol), once per header
block, DATA chunk or event. The owner must not call ``send`` on the session
whose ``recv`` or ``send`` is running (nghttp2 forbids it); it marks the session
dirty and sends after ``recv`` returns.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from sidecar.proxy.http2._nghttp2 import ffi, lib

log = logging.getLogger(__name__)

EV_CLOSE = lib.TC_EV_CLOSE
EV_GOAWAY = lib.TC_EV_GOAWAY
EV_NOT_SENT = lib.TC_EV_NOT_SENT
EV_DRAINED = lib.TC_EV_DRAINED

NO_ERROR = lib.NGHTTP2_NO_ERROR
PROTOCOL_ERROR = lib.NGHTTP2_PROTOCOL_ERROR
INTERNAL_ERROR = lib.NGHTTP2_INTERNAL_ERROR
REFUSED_STREAM = lib.NGHTTP2_REFUSED_STREAM
CANCEL = lib.NGHTTP2_CANCEL
ENHANCE_YOUR_CALM = lib.NGHTTP2_ENHANCE_YOUR_CALM

HCAT_REQUEST = lib.NGHTTP2_HCAT_REQUEST
HCAT_RESPONSE = lib.NGHTTP2_HCAT_RESPONSE
HCAT_HEADERS = lib.NGHTTP2_HCAT_HEADERS

# Limits (see DESIGN.md and the issue): header lists over 64 KiB are refused; a stream may
# have 256 KiB in flight towards us, a connection 1 MiB, which bounds what one client can
# make us hold; rapid reset as nghttp2 1.57+ defaults it (1000 burst, 33/s).
MAX_HEADER_LIST = 64 * 1024
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
MAX_CONCURRENT_STREAMS = 128
SEND_CHUNK = 256 * 1024  # bytes gathered per ``send`` call


class Peer(Protocol):
    """What a session tells its owner."""

    def on_headers(self, sid: int, cat: int, block: bytes, end: bool, over: bool) -> None: ...

    def on_data(self, sid: int, data: bytes, end: bool) -> None: ...

    def on_event(self, kind: int, sid: int, code: int) -> None: ...


def _limits() -> Any:
    lim = ffi.new("tc_limits *")
    lim.max_concurrent_streams = MAX_CONCURRENT_STREAMS
    lim.stream_window = STREAM_WINDOW
    lim.connection_window = CONNECTION_WINDOW
    lim.max_header_list = MAX_HEADER_LIST
    lim.reset_burst = 1000
    lim.reset_rate = 33
    lim.max_continuations = 8
    lim.max_settings = 32
    lim.max_outbound_ack = 1000
    return lim


_LIMITS = _limits()


class H2Error(Exception):
    """nghttp2 answered a fatal error: the connection must close."""

    def __init__(self, code: int) -> None:
        super().__init__(ffi.string(lib.nghttp2_strerror(code)).decode() if code else "error")
        self.code = code


def new_stream() -> Any:
    """A send queue for one stream's DATA, freed when Python drops it."""
    return ffi.gc(lib.tc_stream_new(), lib.tc_stream_free)


def count(block: bytes) -> int:
    """Fields in a packed ``name\\0value\\0`` block."""
    return block.count(b"\0") >> 1


class Session:
    """One HTTP/2 connection's protocol state, in C."""

    __slots__ = ("_handle", "_ts")

    def __init__(self, server: bool, peer: Peer) -> None:
        # The callbacks get ``peer`` itself back from the handle. The peer holds this
        # session, the session the handle: one cycle, collected with the connection.
        self._handle = ffi.new_handle(peer)
        ts = lib.tc_session_new(1 if server else 0, self._handle, _LIMITS)
        if ts == ffi.NULL:
            raise MemoryError("nghttp2 session")
        self._ts = ffi.gc(ts, lib.tc_session_del)

    def recv(self, data: bytes) -> None:
        n = lib.tc_recv(self._ts, data, len(data))
        if n < 0:
            raise H2Error(n)

    def send(self) -> bytes:
        """Everything the session has to send now (empty if nothing)."""
        out = b""
        while True:
            n = lib.tc_send(self._ts, SEND_CHUNK)
            if n < 0:
                raise H2Error(n)
            if n == 0:
                return out
            out += ffi.buffer(lib.tc_out(self._ts), n)[:]
            if n < SEND_CHUNK:
                return out

    def finished(self) -> bool:
        """nghttp2 wants neither to read nor to write: the connection is done."""
        return bool(lib.tc_finished(self._ts))

    def request(self, block: bytes, stream: Any) -> int:
        """Submit a request head (``stream`` None: no body follows); the stream id or < 0."""
        return lib.tc_submit_request(
            self._ts, block, len(block), count(block), stream if stream is not None else ffi.NULL
        )

    def response(self, sid: int, block: bytes, stream: Any) -> int:
        return lib.tc_submit_response(
            self._ts,
            sid,
            block,
            len(block),
            count(block),
            stream if stream is not None else ffi.NULL,
        )

    def headers(self, sid: int, block: bytes, end: bool) -> int:
        """A non-final (1xx) or trailers-only block outside a data provider."""
        return lib.tc_submit_headers(self._ts, sid, block, len(block), count(block), end)

    def write(self, stream: Any, data: bytes) -> int:
        """Queue DATA on ``stream``; returns how much it now holds unsent."""
        lib.tc_write(self._ts, stream, data, len(data))
        return lib.tc_buffered(stream)

    def end(self, stream: Any, trailers: bytes | None) -> None:
        if trailers:
            lib.tc_end(self._ts, stream, trailers, len(trailers), count(trailers))
        else:
            lib.tc_end(self._ts, stream, ffi.NULL, 0, 0)

    def consume(self, sid: int, n: int) -> None:
        lib.tc_consume(self._ts, sid, n)

    def reset(self, sid: int, code: int) -> None:
        lib.tc_reset(self._ts, sid, code)

    def goaway(self, code: int = NO_ERROR) -> None:
        """GOAWAY naming the last stream processed: those in flight finish."""
        lib.tc_goaway(self._ts, code)

    def terminate(self, code: int) -> None:
        lib.tc_terminate(self._ts, code)

    def remote_max_streams(self) -> int:
        return lib.tc_remote_max_streams(self._ts)


class ClosedSession:
    """Stands in for the session of a closed connection (see ``Conn.connection_lost``).

    The session holds a handle on its connection, which holds the session: dropping the
    session when the connection is gone frees both by reference count, without waiting
    for a full garbage collection. A stale caller meets this instead: nothing to send,
    nothing accepted.
    """

    __slots__ = ()

    def recv(self, data: bytes) -> None:
        pass

    def send(self) -> bytes:
        return b""

    def finished(self) -> bool:
        return True

    def request(self, block: bytes, stream: Any) -> int:
        return -1

    def response(self, sid: int, block: bytes, stream: Any) -> int:
        return -1

    def headers(self, sid: int, block: bytes, end: bool) -> int:
        return -1

    def write(self, stream: Any, data: bytes) -> int:
        return 0

    def end(self, stream: Any, trailers: bytes | None) -> None:
        pass

    def consume(self, sid: int, n: int) -> None:
        pass

    def reset(self, sid: int, code: int) -> None:
        pass

    def goaway(self, code: int = NO_ERROR) -> None:
        pass

    def terminate(self, code: int) -> None:
        pass

    def remote_max_streams(self) -> int:
        return 0


CLOSED = ClosedSession()


def buffered(stream: Any) -> int:
    return lib.tc_buffered(stream)


def notify_below(stream: Any, mark: int) -> None:
    lib.tc_notify_below(stream, mark)


# ------------------------------------------------------------ callbacks from C
# A raising owner fails the callback: nghttp2 then fails the connection, never the process.


def _failed(exc_type: Any, exc: BaseException, tb: Any) -> None:
    log.error("HTTP/2 callback failed", exc_info=(exc_type, exc, tb))


@ffi.def_extern(onerror=lambda *a: _failed(*a) or 1)
def tc_py_headers(handle: Any, sid: int, cat: int, buf: Any, n: int, end: int, over: int) -> int:
    ffi.from_handle(handle).on_headers(
        sid, cat, ffi.buffer(buf, n)[:] if n else b"", bool(end), bool(over)
    )
    return 0


@ffi.def_extern(onerror=lambda *a: _failed(*a) or 1)
def tc_py_data(handle: Any, sid: int, data: Any, n: int, end: int) -> int:
    ffi.from_handle(handle).on_data(sid, ffi.buffer(data, n)[:] if n else b"", end)
    return 0


@ffi.def_extern(onerror=lambda *a: _failed(*a) or 1)
def tc_py_event(handle: Any, kind: int, sid: int, code: int) -> int:
    ffi.from_handle(handle).on_event(kind, sid, code)
    return 0
