"""Writes of one loop turn: the first at once, the rest together when the turn is done.

Each callback of a proxy writes to a socket whose peer (the client, the upstream,
the app) may be asleep on another CPU. Written at once, a write often wakes that
peer with an inter-processor interrupt (a VM exit on a virtual machine), and the
peer is asleep again before the next write of the same turn: under ``make bench``'s
load that was one interrupt per six requests, 2.5 times nginx's rate, and about
two microseconds of kernel time per request. Here the first write of a turn goes
at once (a lone request waits for nothing), and the later ones are queued and
written one after the other at the end of the turn (``loop.call_soon``): a busy
turn wakes each peer about once, and the rate falls to nginx's.

Order is kept because every write, half-close and close of a proxied transport
goes through the batch (``abort`` needs not: it throws unsent bytes away), and a
close or half-close first sends what is queued. Queued bytes are bounded by
``MAX_QUEUED``: beyond it the batch is sent at once, so a large body still meets
the transports' backpressure (``pause_writing``) within one read.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# Bytes queued in one turn before the batch is sent on the spot: requests and
# answers of a few kilobytes wait for the end of the turn, bodies streamed in large
# reads do not.
MAX_QUEUED = 64 * 1024


class WriteBatch:
    """The writes of the current loop turn, in the order they were made.

    ``scheduled``: this turn has written already, and its end is scheduled.
    """

    __slots__ = ("loop", "queued", "scheduled", "size")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queued: list[tuple[asyncio.WriteTransport, bytes]] = []
        self.size = 0
        self.scheduled = False

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Send ``data`` on ``transport``: the turn's first write at once, later ones at
        its end, after the writes made before them."""
        if not self.scheduled:  # nothing is queued: the turn's first write
            self.scheduled = True
            self.loop.call_soon(self._turn_ended)
            if not transport.is_closing():  # as in ``flush``
                transport.write(data)
            return
        self.queued.append((transport, data))
        size = self.size = self.size + len(data)
        if size > MAX_QUEUED:
            self.flush()

    def close(self, transport: asyncio.BaseTransport) -> None:
        """Close ``transport`` once what was queued before is on its way."""
        if self.queued:
            self.flush()
        transport.close()

    def write_eof(self, transport: asyncio.WriteTransport) -> None:
        """Half-close ``transport`` once what was queued before is on its way."""
        if self.queued:
            self.flush()
        transport.write_eof()

    def flush(self) -> None:
        """Hand every queued write to its transport now, in order."""
        queued = self.queued
        self.queued = []
        self.size = 0
        for transport, data in queued:
            if transport.is_closing():
                continue  # lost, or aborted: its unsent bytes go nowhere
            try:
                transport.write(data)
            except RuntimeError as exc:  # written after its write_eof: a proxy bug
                log.error("dropped a queued write: %s", exc)

    def _turn_ended(self) -> None:
        self.scheduled = False
        if self.queued:
            self.flush()
