"""Byte pipes for CONNECT and ``Upgrade`` (WebSocket): after the handshake HTTP is over.

Both protocols keep working as asyncio protocols and hand their bytes here.
Half-closes are passed on (a client that shuts down its sending side still gets
the rest of the answer), and the pipe closes once both directions have ended or
either socket is lost. Backpressure uses the same ``PEER_FULL`` links as HTTP
exchanges, set up by the protocols when they attach.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.proxy.batch import WriteBatch


class _Side(Protocol):
    transport: asyncio.Transport | None
    rx: bool


class Tunnel:
    """The pipe between a downstream client and its upstream connection."""

    __slots__ = ("batch", "down", "eofs", "up")

    def __init__(self, down: _Side, up: _Side, batch: WriteBatch) -> None:
        self.down = down
        self.up = up
        self.batch = batch
        self.eofs = 0

    def from_client(self, data: bytes) -> None:
        # Activity either way keeps the downstream's idle clock at zero: an upload-only
        # stream (a WebSocket that only sends, a CONNECT push) is as alive as a download.
        self.down.rx = True
        self.batch.write(self.up.transport, data)  # type: ignore[arg-type]

    def from_upstream(self, data: bytes) -> None:
        self.down.rx = True
        self.batch.write(self.down.transport, data)  # type: ignore[arg-type]

    def client_eof(self) -> bool:
        """The client finished sending; True keeps its socket open for the answer."""
        return self._half_close(self.up.transport)

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
            if side.transport is not None and not side.transport.is_closing():
                self.batch.close(side.transport)
