"""Adaptive batching: full batches under a backlog, no wait while the model is idle, the
wait capped while it is busy. Driven by a list of arrivals and a fake clock."""

from __future__ import annotations

import pytest

from processors.batching import BatchPolicy, assemble


class Arrivals:
    """Messages arriving at given times on a fake clock; `fetch` takes what has arrived,
    advancing the clock while it waits (as librdkafka's batch consume does)."""

    def __init__(self, times: list[float]) -> None:
        self.times = sorted(times)
        self.now = 0.0
        self.taken = 0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def _ready(self) -> int:
        return sum(1 for t in self.times[self.taken :] if t <= self.now)

    def fetch(self, n: int, timeout_s: float) -> int:
        self.waits.append(timeout_s)
        ready = self._ready()
        if ready < n and timeout_s > 0:
            # librdkafka waits for all n or the whole timeout, whichever comes first.
            future = [t for t in self.times[self.taken :] if t > self.now]
            needed = n - ready
            if len(future) >= needed and future[needed - 1] - self.now <= timeout_s:
                self.now = future[needed - 1]
            else:
                self.now += timeout_s
            ready = self._ready()
        got = min(n, ready)
        self.taken += got
        return got


def batches(arrivals: Arrivals, policy: BatchPolicy, model_idle, *, first_timeout_s=0.5):
    sizes = []
    while True:
        size, why = assemble(
            arrivals.fetch,
            policy=policy,
            model_idle=model_idle,
            first_timeout_s=first_timeout_s,
            clock=arrivals.clock,
        )
        if not size:
            return sizes
        sizes.append((size, why))


POLICY = BatchPolicy(max_size=8, max_wait_s=0.05)


def test_under_a_backlog_every_batch_is_full_whether_the_model_is_busy_or_idle() -> None:
    for idle in (True, False):
        backlog = Arrivals([0.0] * 80)
        assert batches(backlog, POLICY, lambda idle=idle: idle) == [(8, "full")] * 10
        # Nothing was waited for: every image was already buffered.
        assert backlog.now == pytest.approx(0.5)  # only the final empty wait for more


def test_an_idle_model_never_waits_for_a_batch_to_fill() -> None:
    trickle = Arrivals([0.0, 0.01, 0.02])
    sizes = batches(trickle, POLICY, lambda: True)
    assert sizes == [(1, "idle")] * 3
    # Each image closed its batch at once: no wait was asked beyond the one for it.
    assert all(w in (0.0, 0.5) for w in trickle.waits), trickle.waits


def test_a_busy_model_lets_the_batch_fill_for_at_most_the_wait() -> None:
    trickle = Arrivals([i * 0.004 for i in range(40)])  # 250 images/s
    sizes = batches(trickle, POLICY, lambda: False)
    assert all(why in ("full", "waited") for _, why in sizes)
    assert sum(size for size, _ in sizes) == 40
    # Batches fill up (8 images arrive in 32 ms, under the 50 ms cap).
    assert [size for size, _ in sizes[:4]] == [8, 8, 8, 8]

    sparse = Arrivals([i * 0.02 for i in range(10)])  # 50 images/s: 3 per 50 ms
    sizes = batches(sparse, POLICY, lambda: False)
    assert {why for _, why in sizes} == {"waited"}
    assert max(size for size, _ in sizes) <= 4


def test_a_batch_closes_as_soon_as_the_model_becomes_idle() -> None:
    arrivals = Arrivals([0.0, 0.001, 0.030])
    busy_until = 0.010
    size, why = assemble(
        arrivals.fetch,
        policy=POLICY,
        model_idle=lambda: arrivals.now >= busy_until,
        first_timeout_s=0.5,
        clock=arrivals.clock,
    )
    assert (size, why) == (2, "idle")
    # It noticed within one tick, long before the 50 ms cap.
    assert busy_until <= arrivals.now <= busy_until + POLICY.tick_s


def test_nothing_arrives() -> None:
    assert assemble(
        Arrivals([]).fetch, policy=POLICY, model_idle=lambda: True, first_timeout_s=0.1
    ) == (0, "")


def test_nonsense_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_size=0, max_wait_s=0.05)
    with pytest.raises(ValueError):
        BatchPolicy(max_size=8, max_wait_s=-1)
