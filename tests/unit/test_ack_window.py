"""The in-order ack window: acks follow offsets per partition, whatever order work ends in."""

from __future__ import annotations

import asyncio
import random

import pytest

from processors.ack_window import InOrderAcks


def track_all(acks: InOrderAcks, partition: str, offsets: range, acked: list) -> list:
    return [acks.track(partition, lambda o=o: acked.append((partition, o))) for o in offsets]


def test_a_slow_record_holds_the_acks_behind_it_not_their_work() -> None:
    acks, acked = InOrderAcks(max_unacked=100), []
    pending = track_all(acks, "p0", range(10, 16), acked)
    for p in pending[1:]:  # 11..15 finish first, 10 is the slow photo
        assert acks.finish(p) == 0
    assert acked == [] and acks.waiting("p0") == 5 and acks.unacked == 6
    assert acks.finish(pending[0]) == 6
    assert acked == [("p0", o) for o in range(10, 16)] and acks.unacked == 0


def test_partitions_are_independent() -> None:
    acks, acked = InOrderAcks(max_unacked=100), []
    a = track_all(acks, "a", range(3), acked)
    b = track_all(acks, "b", range(3), acked)
    acks.finish(b[0])
    acks.finish(b[1])
    acks.finish(a[1])
    assert acked == [("b", 0), ("b", 1)]
    acks.finish(a[0])
    assert acked[-2:] == [("a", 0), ("a", 1)]


def test_random_finishing_orders_ack_a_contiguous_prefix_only() -> None:
    rng = random.Random(606)
    for _ in range(200):
        acks, acked = InOrderAcks(max_unacked=1000), []
        n = rng.randint(1, 40)
        pending = track_all(acks, "p", range(n), acked)
        order = list(range(n))
        rng.shuffle(order)
        finished: set[int] = set()
        for i in order:
            acks.finish(pending[i])
            finished.add(i)
            # What is acked is exactly the longest finished prefix, in order.
            prefix = 0
            while prefix in finished:
                prefix += 1
            assert acked == [("p", o) for o in range(prefix)]


def test_the_window_bounds_unacked_records() -> None:
    async def main() -> None:
        acks, acked = InOrderAcks(max_unacked=3), []
        pending = []
        for o in range(3):
            await acks.reserve()
            pending.append(acks.track("p", lambda o=o: acked.append(o)))
        blocked = asyncio.create_task(acks.reserve())
        await asyncio.sleep(0.01)
        assert not blocked.done()  # full: consumption waits
        acks.finish(pending[1])
        acks.finish(pending[2])
        await asyncio.sleep(0.01)
        assert not blocked.done()  # finished but not acked still counts
        acks.finish(pending[0])
        await asyncio.wait_for(blocked, 1.0)
        assert acked == [0, 1, 2]

    asyncio.run(main())


def test_max_unacked_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InOrderAcks(max_unacked=0)
