"""Backpressure between the two sockets of a proxied exchange.

A connection's reading can be paused for several independent reasons at once:
its peer's write buffer is over the high-water mark, a pipelined request waits
for its turn, or a body waits for an upstream connection. Each reason is a bit,
and reading resumes only when no bit is left, so two reasons never undo each
other (uvicorn's ``FlowControl`` tracks one flag; a proxy has two sockets).
"""

from __future__ import annotations

import asyncio

# Why reading is paused; one bit each.
PEER_FULL = 1  # the other side's transport is over its high-water mark
WAITING = 2  # bytes are buffered until an upstream connection or a tunnel is ready
QUEUED = 4  # a pipelined request waits behind the one being answered


class FlowControl:
    """Pause/resume reading of one transport by reason bits; idempotent both ways."""

    __slots__ = ("mask", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.mask = 0

    def pause(self, reason: int) -> None:
        if not self.mask and not self.transport.is_closing():
            self.transport.pause_reading()
        self.mask |= reason

    def resume(self, reason: int) -> None:
        if self.mask & reason:
            self.mask &= ~reason
            if not self.mask and not self.transport.is_closing():
                self.transport.resume_reading()
