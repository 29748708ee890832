"""Byte pipes: the opaque TCP relay, and CONNECT and ``Upgrade`` after their handshake.

``Opaque`` serves a captured connection that speaks no HTTP (or a server-first
protocol on an opaque port): its bytes go to the original destination as they
come. CONNECT and ``Upgrade`` (WebSocket) join the same ``Tunnel`` once HTTP is
over. The HTTP protocols keep working as asyncio protocols and hand their bytes here.
Half-closes are passed on (a client that shuts down its sending side still gets
the rest of the answer), and the pipe closes once both directions have ended or
either socket is lost. Backpressure uses the same ``PEER_FULL`` links as HTTP
exchanges, set up by the protocols when they attach.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from sidecar.proxy.flow import PEER_FULL, WAITING, FlowControl

if TYPE_CHECKING:
    from sidecar.policy import Timeouts
    from sidecar.proxy.batch import WriteBatch
    from sidecar.proxy.http1.downstream import Shared
    from sidecar.proxy.http1.upstream import UpstreamConnection

log = logging.getLogger(__name__)


class _Side(Protocol):
    transport: asyncio.Transport | None
    rx: bool


class Tunnel:
    """The pipe between a downstream client and its upstream connection."""

    __slots__ = ("batch", "color", "counts", "down", "eofs", "up")

    def __init__(self, down: _Side, up: _Side | None, batch: WriteBatch) -> None:
        self.down = down
        self.up = up  # None until an opaque relay's upstream is connected
        self.batch = batch
        self.eofs = 0
        self.counts: dict[str, int] | None = None  # color -> bytes, for opaque relays
        self.color = ""

    def meter(self, counts: dict[str, int], color: str) -> None:
        """Count the bytes relayed both ways under ``color`` (opaque relays)."""
        self.counts = counts
        self.color = color
        counts.setdefault(color, 0)

    def from_client(self, data: bytes) -> None:
        if self.counts is not None:
            self.counts[self.color] += len(data)
        # Activity either way keeps the downstream's idle clock at zero: an upload-only
        # stream (a WebSocket that only sends, a CONNECT push) is as alive as a download.
        self.down.rx = True
        self.batch.write(self.up.transport, data)  # type: ignore[union-attr,arg-type]

    def from_upstream(self, data: bytes) -> None:
        if self.counts is not None:
            self.counts[self.color] += len(data)
        self.down.rx = True
        self.batch.write(self.down.transport, data)  # type: ignore[arg-type]

    def client_eof(self) -> bool:
        """The client finished sending; True keeps its socket open for the answer."""
        return self._half_close(self.up.transport)  # type: ignore[union-attr]

    def upstream_eof(self) -> bool:
        return self._half_close(self.down.transport)

    def _half_close(self, other: asyncio.Transport | None) -> bool:
        self.eofs += 1
        if self.eofs >= 2 or other is None or other.is_closing() or not other.can_write_eof():
            self.close()
            return False
        self.batch.write_eof(other)
        return True

    def close(self) -> None:
        for side in (self.down, self.up):
            if side is not None and side.transport is not None and not side.transport.is_closing():
                self.batch.close(side.transport)


class Opaque(asyncio.Protocol):
    """A captured client connection relayed byte for byte to where it was going.

    The upstream side is an ``UpstreamConnection`` made by ``Pool.connect`` for
    (pod color, destination), always a new one: the flow is registered with the
    kernel data path before its SYN, carries the sidecar's own mark, and counts
    among the open flows like any other; it is never pooled, as its bytes are the
    client's. Both sockets are joined by a ``Tunnel`` from the start (a server-first
    upstream may speak before the connect callback runs): backpressure both ways,
    half-close passed on. Client bytes that come while connecting are held, with
    reading paused. No idle timeout: long quiet database connections are the norm.
    """

    __slots__ = (
        "closed",
        "color",
        "direction",
        "dst",
        "early",
        "eof",
        "flow",
        "rx",
        "shared",
        "transport",
        "tunnel",
        "up",
        "write_paused",
    )

    queue = ()  # what ``Proxy.drain`` looks at: a relay runs until the drain deadline

    def __init__(self, shared: Shared, direction: str, dst: tuple[str, int]) -> None:
        self.shared = shared
        self.direction = direction
        self.dst = dst
        self.color = shared.ctx.colorer.pod_color
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.tunnel = Tunnel(self, None, shared.batch)
        self.tunnel.meter(shared.ctx.metrics.direction(direction).opaque_bytes, self.color)
        self.up: UpstreamConnection | None = None
        self.early: list[bytes] = []
        self.eof = False
        self.closed = False
        self.rx = False
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)  # type: ignore[arg-type]
        shared = self.shared
        shared.conns.add(self)  # type: ignore[arg-type]
        if shared.draining:
            self._close()
            return
        self.flow.pause(WAITING)
        host, port = self.dst
        if self.direction == "inbound":
            host = shared.ctx.app.host  # the app, on the port the client dialled
        connect = shared.pool.connect((self.color, host, port), self.tunnel)
        shared.loop.create_task(connect).add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        exc = TimeoutError() if task.cancelled() else task.exception()
        if exc is not None:
            log.info(
                "opaque %s relay to %s:%d: cannot connect (%r)", self.direction, *self.dst, exc
            )
            if not self.closed:
                self.transport.abort()  # type: ignore[union-attr]  # refused, as it would be
            return
        conn = self.tunnel.up = task.result()
        if self.closed or conn.closed or conn.transport is None or conn.transport.is_closing():
            self.tunnel.close()
            return
        conn.down = self  # type: ignore[assignment]
        self.up = conn
        if conn.write_paused:
            self.flow.pause(PEER_FULL)
        if self.write_paused:
            conn.flow.pause(PEER_FULL)  # type: ignore[union-attr]
        early, self.early = self.early, []
        if early:
            self.tunnel.from_client(b"".join(early))
        if self.eof and not self.tunnel.client_eof():
            return
        self.flow.resume(WAITING)

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.tunnel.from_client(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.up is not None:
            return self.tunnel.client_eof()
        self.eof = True  # passed on once the upstream is connected
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.up is not None:
            self.up.flow.pause(PEER_FULL)  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None:
            self.up.flow.resume(PEER_FULL)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.shared.conns.discard(self)  # type: ignore[arg-type]
        self.tunnel.close()

    def _close(self) -> None:
        self.tunnel.close()

    def sweep(self, now: float, timeouts: Timeouts) -> None:
        """No timeout of its own: the relay lasts as long as both ends want it."""
