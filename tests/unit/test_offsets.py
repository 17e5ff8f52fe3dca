"""Offsets become committable only past records delivered together with every earlier one."""

from __future__ import annotations

import random
import threading

from infra.exceptions import BrokerError
from processors.offsets import DeliveredOffsets


def test_out_of_order_deliveries_commit_only_the_delivered_prefix() -> None:
    offsets = DeliveredOffsets()
    a = [offsets.track("images", 0, o) for o in range(10, 15)]
    b = [offsets.track("images", 1, o) for o in range(3)]
    done = {p: offsets.delivered_callback(p) for p in a + b}

    done[a[2]](None)
    done[a[1]](None)
    done[b[1]](None)
    assert offsets.take_ready() == {}  # 10 and b's 0 are still undelivered
    done[a[0]](None)
    assert offsets.take_ready() == {("images", 0): 13}  # 10, 11, 12 delivered: next is 13
    done[b[0]](None)
    done[a[4]](None)
    assert offsets.take_ready() == {("images", 1): 2}
    assert offsets.take_ready() == {}
    done[a[3]](None)
    done[b[2]](None)
    assert offsets.take_ready() == {("images", 0): 15, ("images", 1): 3}
    assert offsets.in_flight == 0 and offsets.delivered == 8


def test_a_failed_delivery_blocks_its_partition_and_is_reported() -> None:
    offsets = DeliveredOffsets()
    first, second = offsets.track("images", 0, 0), offsets.track("images", 0, 1)
    offsets.delivered_callback(first)(BrokerError("broker said no"))
    offsets.delivered_callback(second)(None)
    assert offsets.take_ready() == {}
    assert isinstance(offsets.failure, BrokerError)
    assert offsets.in_flight == 2


def test_deliveries_from_many_threads_in_any_order() -> None:
    offsets = DeliveredOffsets()
    pending = [(p, offsets.track("images", p, o)) for o in range(500) for p in range(3)]
    callbacks = [offsets.delivered_callback(h) for _, h in pending]
    random.Random(3).shuffle(callbacks)
    seen: list[dict] = []
    taking = threading.Lock()  # so that `seen` is in the order offsets were taken

    def deliver(chunk) -> None:
        for callback in chunk:
            callback(None)
            with taking:
                seen.append(offsets.take_ready())

    threads = [threading.Thread(target=deliver, args=(callbacks[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen.append(offsets.take_ready())
    final: dict = {}
    for ready in seen:
        for key, offset in ready.items():
            assert offset > final.get(key, 0)  # never goes back
            final[key] = offset
    assert final == {("images", p): 500 for p in range(3)}
