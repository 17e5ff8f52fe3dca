"""Adaptive batch assembly for the inference consumer.

A batch is filled from the consumer's fetch buffer and closes as soon as one of these
holds, checked in this order:

1. ``full``: it holds `max_size` images;
2. ``idle``: no further image is ready right now and the model stage is idle (no batch
   queued or running): holding the batch back could only delay it, since the model would
   wait for it meanwhile;
3. ``waited``: `max_wait_s` have passed since its first image while the model was busy
   (the latency cap; the batch then queues behind the one the model is running).

So under a backlog, when the fetch buffer always holds the next images, every batch is
full; when the model is idle an image never waits for company (light traffic runs batches
of one at once); and the wait is only ever paid while the model could not have taken the
batch anyway. The policy is plain logic over a `fetch` function and a clock, so tests drive
it with a list and a fake clock; the consumer drives it with librdkafka.

librdkafka's batch consume waits for its whole count or its whole timeout, whichever
comes first, so the first image is waited for alone (``fetch(1, timeout)``) and the rest
taken with a zero timeout (what is already buffered); while the model is busy, new
arrivals are waited for one at a time in short ticks, so a tick never holds back a batch
once the model frees up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

#: Takes at most n messages, waiting at most timeout_s for them; returns how many it took.
Fetch = Callable[[int, float], int]


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int
    max_wait_s: float
    #: How long one wait for a new arrival lasts while the model is busy; bounds how late
    #: a batch notices that the model became idle.
    tick_s: float = 0.002

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.max_wait_s < 0 or self.tick_s <= 0:
            raise ValueError(f"invalid batch policy {self}")


def assemble(
    fetch: Fetch,
    *,
    policy: BatchPolicy,
    model_idle: Callable[[], bool],
    first_timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, str]:
    """Fill one batch through `fetch`: (its size, why it closed), or (0, "") when nothing
    arrived within `first_timeout_s`."""
    taken = fetch(1, first_timeout_s)
    if not taken:
        return 0, ""
    deadline = clock() + policy.max_wait_s
    while taken < policy.max_size:
        got = fetch(policy.max_size - taken, 0.0)  # what is buffered already
        if got:
            taken += got
            continue
        if model_idle():
            return taken, "idle"
        left = deadline - clock()
        if left <= 0:
            return taken, "waited"
        taken += fetch(1, min(left, policy.tick_s))
    return taken, "full"
