"""Which consumed offsets may be committed: only past records whose output is delivered.

Every consumed record is tracked in consumption order and finished when the one record it
produced (a result or a dead letter) is acknowledged by the broker, in whatever order
those acknowledgements come. A partition's committable offset is the one after its last
record that is finished together with every record consumed before it on that partition
(`infra.inorder.InOrderWindow`); a record whose delivery failed is never finished, so
nothing past it is ever committed, and it is consumed again after a restart.

Thread-safe: records are tracked on the consumer's thread and finished on the producer's
delivery-report thread.
"""

from __future__ import annotations

import threading
from typing import Any

from infra.inorder import InOrderWindow, Pending

TopicPartitionKey = tuple[str, int]


class DeliveredOffsets:
    """Tracks consumed records until delivered; hands out the offsets now committable."""

    def __init__(self) -> None:
        self._window = InOrderWindow()
        self._lock = threading.Lock()
        self._ready: dict[TopicPartitionKey, int] = {}
        self._failure: BaseException | None = None
        self.delivered = 0

    @property
    def in_flight(self) -> int:
        """Records tracked and not yet committable (undelivered, or behind one that is)."""
        return self._window.unfinished_or_waiting

    @property
    def failure(self) -> BaseException | None:
        """The first delivery error, if any: past it nothing is committable."""
        return self._failure

    def track(self, topic: str, partition: int, offset: int) -> Pending:
        """Track the next consumed record of (topic, partition), in consumption order."""
        key = (topic, partition)
        return self._window.track(key, lambda: self._advance(key, offset + 1))

    def track_message(self, message: Any) -> Pending:
        return self.track(message.topic(), message.partition(), message.offset())

    def _advance(self, key: TopicPartitionKey, next_offset: int) -> None:
        with self._lock:
            self._ready[key] = next_offset

    def delivered_callback(self, pending: Pending):
        """The `on_delivery` for the record `pending` produced."""

        def on_delivery(error: Exception | None) -> None:
            if error is None:
                with self._lock:
                    self.delivered += 1
                self._window.finish(pending)
            elif self._failure is None:
                self._failure = error

        return on_delivery

    def take_ready(self) -> dict[TopicPartitionKey, int]:
        """Offsets (next to read) that became committable since the last call."""
        with self._lock:
            ready, self._ready = self._ready, {}
        return ready
