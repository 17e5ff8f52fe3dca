"""Acks in offset order, per partition, for an agent that finishes records out of order.

The Faust agent works on many tweets at once, and a slow photo finishes long after the
tweets behind it. faust-streaming commits from the set of acked offsets, and its gap
check is unsafe when acks come out of order (faust-streaming issue #606: with offset 10
committed, 10 in flight and 11-15 acked, it commits 16; with nothing or offset 0
committed it does not check at all), so a crash could lose the tweet still in flight.

`InOrderAcks` makes the order of acks the order of offsets: a record is acked only once
it and every record consumed before it on the same partition are finished. The set Faust
sees is then always a contiguous run after its committed offset, which its commit logic
handles correctly, and the committed offset never passes a record still in flight.

Two bounds: the caller's own bound on work in flight, released as each record finishes
(so one slow record never holds up the work behind it), and `max_unacked` here, released
as records are acked (so the finished records waiting behind a slow one stay bounded in
memory). `reserve()` waits when the window is full: backpressure on consumption.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable


class Pending:
    """One tracked record: finished or not, and how to ack it."""

    __slots__ = ("ack", "finished", "partition")

    def __init__(self, partition: Hashable, ack: Callable[[], object]) -> None:
        self.partition = partition
        self.ack = ack
        self.finished = False


class InOrderAcks:
    """Per-partition windows of tracked records; acks each window's finished prefix."""

    def __init__(self, *, max_unacked: int) -> None:
        if max_unacked < 1:
            raise ValueError("max_unacked must be at least 1")
        self.max_unacked = max_unacked
        self._windows: dict[Hashable, deque[Pending]] = {}
        self._space = asyncio.Semaphore(max_unacked)
        self.acked = 0

    @property
    def unacked(self) -> int:
        """Records tracked and not yet acked, finished or not."""
        return sum(len(window) for window in self._windows.values())

    def waiting(self, partition: Hashable) -> int:
        """Finished records of `partition` whose ack waits for an earlier one."""
        return sum(p.finished for p in self._windows.get(partition, ()))

    async def reserve(self) -> None:
        """Wait for room in the window; call once before each `track`."""
        await self._space.acquire()

    def track(self, partition: Hashable, ack: Callable[[], object]) -> Pending:
        """Track the next record of `partition`, in consumption (offset) order."""
        pending = Pending(partition, ack)
        self._windows.setdefault(partition, deque()).append(pending)
        return pending

    def finish(self, pending: Pending) -> int:
        """Mark `pending` finished; ack its partition's finished prefix. Returns acks made."""
        pending.finished = True
        window = self._windows[pending.partition]
        made = 0
        while window and window[0].finished:
            window.popleft().ack()
            self._space.release()
            made += 1
        if not window:
            del self._windows[pending.partition]
        self.acked += made
        return made
