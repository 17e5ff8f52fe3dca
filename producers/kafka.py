"""Writing Tweets to Kafka: one idempotent producer, keyed by tweet id."""

from __future__ import annotations

import logging
import time

from infra.kafka import DeliveryTracker, produce, producer_config
from infra.settings import Settings
from schemas.codec import Codec

log = logging.getLogger(__name__)


class TweetProducer:
    """Encodes Tweet records with the codec and produces them to `tweets`.

    The producer is idempotent (`enable.idempotence`), so its own retries never
    duplicate a record; `flush()` waits for every delivery report and raises if
    any failed.
    """

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        self.topic = settings.topic("tweets")
        self.deadletter_topic = settings.topic("deadletter")
        self.codec = Codec.from_settings(settings)
        self.deliveries = DeliveryTracker()
        self.producer = Producer(producer_config(settings))

    def send(self, tweet: dict) -> None:
        self.send_raw(tweet["id"].encode(), self.codec.encode("Tweet", tweet, topic=self.topic))

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Produce bytes as they are (replays, and tests of malformed input)."""
        produce(
            self.producer,
            self.topic,
            key=key,
            value=value,
            on_delivery=self.deliveries.delivery_report,
        )

    def dead_letter(
        self,
        raw: bytes,
        error: BaseException,
        *,
        stage: str,
        source: tuple[str, int, int] = ("", -1, -1),
    ) -> None:
        """A DeadLetter for input that never became a Tweet, through this same producer.

        `source` is (topic, partition, offset) where the input came from; -1 when unknown.
        """
        from schemas.records import dead_letter

        source_topic, partition, offset = source
        record = dead_letter(
            source_topic=source_topic,
            source_partition=partition,
            source_offset=offset,
            stage=stage,
            error=error,
            payload=raw,
        )
        value = self.codec.encode("DeadLetter", record, topic=self.deadletter_topic)
        produce(
            self.producer,
            self.deadletter_topic,
            key=None,
            value=value,
            on_delivery=self.deliveries.delivery_report,
        )

    def flush(self, timeout_s: float = 30.0) -> None:
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise TimeoutError(f"{remaining} tweets not delivered within {timeout_s} s")
        self.deliveries.raise_if_failed()


def produce_synthetic(
    settings: Settings,
    *,
    image_base_url: str,
    rate: float,
    count: int,
    seed: int = 0,
    start: int = 0,
    stop=None,
) -> int:
    """Produce `count` synthetic tweets (0: until `stop` is set) at `rate` per second."""
    from producers.synthetic import SyntheticTweets
    from producers.tweets import tweet_from_stream_line
    from schemas.records import now_ms

    generator = SyntheticTweets(image_base_url=image_base_url, seed=seed)
    producer = TweetProducer(settings)
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    sent = 0
    try:
        n = start
        while (count == 0 or sent < count) and not (stop is not None and stop.is_set()):
            tweet = tweet_from_stream_line(
                generator.line(n), source="synthetic", ingested_at_ms=now_ms()
            )
            producer.send(tweet)
            sent += 1
            n += 1
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.monotonic()
            if sent % 500 == 0:
                log.info("produced %d synthetic tweets", sent)
    finally:
        producer.flush()
    return sent
