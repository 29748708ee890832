"""The write batch: a loop turn's writes leave together, in order, and never after a close."""

from __future__ import annotations

import asyncio

from sidecar.proxy.batch import MAX_QUEUED, WriteBatch


class Recorder(asyncio.WriteTransport):
    """A transport that logs what happens to it, in one log shared by all of them."""

    def __init__(self, name: str, log: list[tuple[str, str, bytes]]) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.closing = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        assert not self.closing, f"{self.name}: write after close"
        self.log.append((self.name, "write", data))

    def write_eof(self) -> None:
        self.log.append((self.name, "eof", b""))

    def close(self) -> None:
        self.closing = True
        self.log.append((self.name, "close", b""))

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


def pair() -> tuple[WriteBatch, Recorder, Recorder, list[tuple[str, str, bytes]]]:
    log: list[tuple[str, str, bytes]] = []
    return WriteBatch(asyncio.get_running_loop()), Recorder("a", log), Recorder("b", log), log


async def test_a_turns_first_write_goes_at_once_the_rest_at_its_end_in_order() -> None:
    batch, a, b, log = pair()
    batch.write(a, b"1")
    assert log == [("a", "write", b"1")]  # a lone request waits for nothing
    batch.write(b, b"2")
    batch.write(a, b"3")
    batch.write(b, b"4")
    assert len(log) == 1  # the rest wait: other callbacks of this turn may add theirs
    await asyncio.sleep(0)
    assert log == [
        ("a", "write", b"1"),
        ("b", "write", b"2"),
        ("a", "write", b"3"),
        ("b", "write", b"4"),
    ]
    batch.write(b, b"5")  # a new turn: its first write goes at once again
    assert log[-1] == ("b", "write", b"5")


async def test_a_close_or_half_close_sends_what_was_queued_first() -> None:
    batch, a, b, log = pair()
    batch.write(b, b"first")
    batch.write(a, b"answer")
    batch.write(b, b"request")
    batch.close(a)
    assert log == [
        ("b", "write", b"first"),
        ("a", "write", b"answer"),
        ("b", "write", b"request"),
        ("a", "close", b""),
    ]
    batch.write(b, b"rest")
    batch.write_eof(b)
    assert log[-2:] == [("b", "write", b"rest"), ("b", "eof", b"")]
    await asyncio.sleep(0)
    assert len(log) == 6  # nothing sent twice at the end of the turn


async def test_a_large_turn_is_sent_at_once() -> None:
    batch, a, b, log = pair()
    batch.write(a, b"first")
    batch.write(a, b"head")
    big = b"x" * MAX_QUEUED
    batch.write(b, big)  # over the bound: written now, backpressure applies now
    assert log == [("a", "write", b"first"), ("a", "write", b"head"), ("b", "write", big)]
    assert batch.size == 0


async def test_writes_to_a_transport_gone_meanwhile_are_dropped_alone() -> None:
    batch, a, b, log = pair()
    gone = Recorder("gone", log)
    gone.abort()
    batch.write(gone, b"never")  # the turn's first write, dropped all the same
    batch.write(a, b"lost")
    batch.write(b, b"kept")
    a.abort()  # connection lost, or aborted at a drain deadline
    await asyncio.sleep(0)
    assert log == [("b", "write", b"kept")]
