"""What the Faust agent learns from downstream: capacity reports and results.

`FeedbackReader` is a thread with a consumer of its own (no group, nothing committed):
it reads the `capacity` topic from its start (a compacted topic: the latest report of
every inference consumer, each said to be history until the end is reached) and
`hashtags` from its end, decodes them and hands them to
callbacks, which the agent runs on its own event loop. Capacity reports feed the
admission controller; results feed the result cache and tell the controller the
model's classes (what a targeted rule is).

Delivery guarantee: none needed. Both inputs are advisory: a report missed is followed
by the next one a second later, a result missed is a cache miss. Undecodable records
are logged and skipped; they are dead-lettered by the processes that consume those
topics for real.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

from infra.exceptions import CodecError, RegistryUnavailableError
from infra.kafka import consumed, consumer_config
from infra.settings import Settings
from schemas.codec import Codec

log = logging.getLogger(__name__)


class FeedbackReader:
    """Reads `capacity` (from its start) and `hashtags` (from its end) in a thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_capacity: Callable[[dict[str, Any], bool], None],
        on_result: Callable[[dict[str, Any]], None],
        codec: Codec | None = None,
    ) -> None:
        self.settings = settings
        self.on_capacity = on_capacity
        self.on_result = on_result
        self.codec = codec or Codec.from_settings(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FeedbackReader:
        self._thread = threading.Thread(target=self._run, name="feedback-reader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _assignment(self, consumer: Consumer) -> list[TopicPartition]:
        wanted = []
        for short, offset in (("capacity", OFFSET_BEGINNING), ("hashtags", OFFSET_END)):
            topic = self.settings.topic(short)
            metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
            partitions = sorted(metadata.partitions) if metadata and metadata.partitions else []
            wanted += [TopicPartition(topic, p, offset) for p in partitions]
        return wanted

    def _run(self) -> None:
        capacity_topic = self.settings.topic("capacity")
        consumer = Consumer(
            consumer_config(
                self.settings,
                f"{self.settings.topic_prefix}tagstream-feedback-unused",
                **{"enable.auto.commit": False, "enable.partition.eof": True},
            )
        )
        # Until the end of `capacity` is reached, the reports read are history: the
        # latest of every consumer that ever ran, dead ones included.
        history = [True]

        def end_of(message: Any) -> None:
            if message.topic() == capacity_topic:
                history[0] = False

        try:
            consumer.assign(self._assignment(consumer))
            while not self._stop.is_set():
                for message in consumed(consumer, 500, 0.2, on_eof=end_of):
                    is_report = message.topic() == capacity_topic
                    record = "CapacityReport" if is_report else "HashtagResult"
                    try:
                        value = self.codec.decode(record, message.value())
                    except (CodecError, RegistryUnavailableError) as exc:
                        # Advisory records: the next report or result will do.
                        log.warning("feedback: skipping an undecodable %s: %s", record, exc)
                        continue
                    if is_report:
                        self.on_capacity(value, history[0])
                    else:
                        self.on_result(value)
        except Exception:  # advisory: the agent goes on without feedback, and says so
            log.exception("feedback reader stopped; admission falls back to its fixed rates")
        finally:
            consumer.close()
