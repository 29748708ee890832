"""The tail both proxy sides share when they stop: the sweeper ended, then a short wait.

A side's connections are aborted before this; their ``connection_lost`` callbacks
(which tell the flow hooks a flow closed) run on later loop turns, so the side waits
for them, briefly and bounded, before it says it has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

SETTLE_ROUNDS = 50  # at most 0.5 s
SETTLE_STEP = 0.01


async def stop_sweeper_and_settle(
    sweeper: asyncio.Task[None] | None, settled: Callable[[], bool]
) -> None:
    """Cancel ``sweeper`` and wait for it, then wait until ``settled()`` (bounded)."""
    if sweeper is not None:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
    for _ in range(SETTLE_ROUNDS):
        if settled():
            break
        await asyncio.sleep(SETTLE_STEP)
