"""The in-order window: items become ready in tracking order per partition, whatever
order they finish in."""

from __future__ import annotations

import random
import threading

from infra.inorder import InOrderWindow


def track_all(window: InOrderWindow, partition: str, offsets: range, ready: list) -> list:
    return [window.track(partition, lambda o=o: ready.append((partition, o))) for o in offsets]


def test_a_slow_item_holds_the_items_behind_it() -> None:
    window, ready = InOrderWindow(), []
    pending = track_all(window, "p0", range(10, 16), ready)
    for p in pending[1:]:  # 11..15 finish first, 10 is the slow photo
        assert window.finish(p) == 0
    assert ready == [] and window.waiting("p0") == 5 and window.unfinished_or_waiting == 6
    assert window.finish(pending[0]) == 6
    assert ready == [("p0", o) for o in range(10, 16)] and window.unfinished_or_waiting == 0


def test_partitions_are_independent() -> None:
    window, ready = InOrderWindow(), []
    a = track_all(window, "a", range(3), ready)
    b = track_all(window, "b", range(3), ready)
    window.finish(b[0])
    window.finish(b[1])
    window.finish(a[1])
    assert ready == [("b", 0), ("b", 1)]
    window.finish(a[0])
    assert ready[-2:] == [("a", 0), ("a", 1)]


def test_random_finishing_orders_ready_exactly_the_finished_prefix() -> None:
    rng = random.Random(606)
    for _ in range(200):
        window, ready = InOrderWindow(), []
        n = rng.randint(1, 40)
        pending = track_all(window, "p", range(n), ready)
        order = list(range(n))
        rng.shuffle(order)
        finished: set[int] = set()
        for i in order:
            window.finish(pending[i])
            finished.add(i)
            prefix = 0
            while prefix in finished:
                prefix += 1
            assert ready == [("p", o) for o in range(prefix)]


def test_finishing_from_several_threads_keeps_the_order() -> None:
    window, ready = InOrderWindow(), []
    pending = track_all(window, "p", range(2000), ready)
    shuffled = list(pending)
    random.Random(1).shuffle(shuffled)
    threads = [
        threading.Thread(target=lambda part=shuffled[i::4]: [window.finish(p) for p in part])
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ready == [("p", o) for o in range(2000)] and window.ready == 2000
