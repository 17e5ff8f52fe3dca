"""Completion in order, per partition, for work that finishes out of order.

Work on a stream often finishes out of order: a slow photo finishes long after the tweets
behind it, a batch's deliveries come back in any order. What may then be committed (an
offset, a source's resume position) is only the longest run of finished work at the head
of each partition. `InOrderWindow` tracks that: each item is tracked in consumption
order, marked finished in any order, and its `on_ready` callback runs only once it and
every item tracked before it on the same partition are finished, in tracking order.

Users: the Faust agent acks tweets to Faust through it (processors/shed_and_fetch.py:
faust-streaming's own commit of out-of-order acks is unsafe, its issue #606); the tweet
source pump saves resume positions through it (producers/source.py).

Thread-safe: items may be finished from a delivery-report thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable


class Pending:
    """One tracked item: finished or not, and what to do once it is ready."""

    __slots__ = ("finished", "on_ready", "partition")

    def __init__(self, partition: Hashable, on_ready: Callable[[], object]) -> None:
        self.partition = partition
        self.on_ready = on_ready
        self.finished = False


class InOrderWindow:
    """Per-partition windows of tracked items; readies each window's finished prefix."""

    def __init__(self) -> None:
        self._windows: dict[Hashable, deque[Pending]] = {}
        self._lock = threading.RLock()
        self.ready = 0

    @property
    def unfinished_or_waiting(self) -> int:
        """Items tracked and not yet ready, finished or not."""
        with self._lock:
            return sum(len(window) for window in self._windows.values())

    def waiting(self, partition: Hashable) -> int:
        """Finished items of `partition` whose turn waits for an earlier one."""
        with self._lock:
            return sum(p.finished for p in self._windows.get(partition, ()))

    def track(self, partition: Hashable, on_ready: Callable[[], object]) -> Pending:
        """Track the next item of `partition`, in consumption (offset) order."""
        pending = Pending(partition, on_ready)
        with self._lock:
            self._windows.setdefault(partition, deque()).append(pending)
        return pending

    def finish(self, pending: Pending) -> int:
        """Mark `pending` finished and ready its partition's finished prefix, in order.

        Returns how many items became ready. `on_ready` runs under the window's (reentrant)
        lock, so that two threads finishing items never ready them out of order."""
        with self._lock:
            pending.finished = True
            window = self._windows.get(pending.partition)
            made = 0
            while window and window[0].finished:
                window.popleft().on_ready()
                made += 1
            if window is not None and not window:
                del self._windows[pending.partition]
            self.ready += made
        return made
