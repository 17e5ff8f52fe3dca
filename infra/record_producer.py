"""The one way records reach Kafka: `RecordProducer`.

Every process writes through it: the tweet sources, the Faust agent (image events, shed
records, dead letters), the inference consumers (results, dead letters, capacity
reports) and the sink (dead letters). It

- encodes each record with the codec, as the record its topic carries (infra/topics.py);
- produces with an idempotent librdkafka producer (infra/kafka.py): its own retries
  never duplicate or reorder a partition;
- applies backpressure: when librdkafka's local queue is full it serves delivery
  reports and retries, so a slow broker slows the caller down instead of losing records;
- tracks deliveries: `flush()` raises `BrokerError` if any record was not delivered, and
  `send_async` gives an awaitable that settles with the record's own delivery report;
- builds dead letters (`dead_letter`) from where a record came from (`SourceRef`) and the
  error, keyed by media key, tweet id or the source key, in that order;
- counts (infra/metrics.py) the records the broker acknowledged and refused, by topic,
  and the dead letters built, by stage and error class (each is produced once: a record
  that cannot be delivered stops its process, or is retried until it is).

Delivery reports are served by `poll()`/`flush()` on the caller's thread, or, once
`send_async` or `start_polling` is used, by a poller thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from infra import metrics
from infra.exceptions import BrokerError
from infra.kafka import producer_config
from infra.settings import TOPIC_NAMES, Settings
from infra.topics import TOPIC_RECORDS
from schemas.codec import Codec
from schemas.records import dead_letter

log = logging.getLogger(__name__)

#: Called with None once a record is delivered, or with the error that failed it.
OnDelivery = Callable[[Exception | None], None]


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a record being processed came from: what a dead letter names.

    A topic, partition and offset for a consumed record; for input that never was a
    record (a stream line, an archive line) a description such as ``x-api-stream`` or
    ``archive:PATH`` with -1 for what is unknown (or the line number as the offset).
    """

    topic: str
    partition: int = -1
    offset: int = -1
    key: bytes | None = None

    @classmethod
    def of(cls, message: Any) -> SourceRef:
        """The source of a confluent-kafka message."""
        return cls(message.topic(), message.partition(), message.offset(), message.key())

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record to produce: a topic of settings (``images``), its key and the value."""

    topic: str
    key: str
    value: Mapping[str, Any]


class DeliveryError(BrokerError):
    """A record the broker did not take. `permanent`: sending it again cannot help (too
    large, invalid); otherwise the broker was away or slow, and a resend may succeed."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


#: Delivery errors that no resend fixes.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)


def _delivery_error(topic: str, error: KafkaError) -> DeliveryError:
    return DeliveryError(
        f"delivery to {topic} failed: {error.str()}", permanent=error.code() in _PERMANENT
    )


def _key_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


class RecordProducer:
    """Encodes records and produces them with backpressure and delivery tracking.

    Topics are named as in settings (``tweets``, ``images``, ``hashtags``, ...): the full
    name (with the prefix) and the record are looked up here. Thread-safe, as librdkafka's
    producer is. `close()` (or ``with``) flushes.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        codec: Codec | None = None,
        client: Any = None,
        **config_overrides: Any,
    ) -> None:

        self.settings = settings
        self._owns_codec = codec is None
        self.codec = codec or Codec.from_settings(settings)
        self.client = client or Producer(producer_config(settings, **config_overrides))
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self._first_error: str | None = None
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        # Full topic names to the short ones the metrics are labelled with.
        self._short = {settings.topic(name): name for name in TOPIC_NAMES}

    # Producing ----------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: Mapping[str, Any],
        *,
        key: str | bytes | None,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        """Encode `value` as the record of `topic` and produce it. Raises CodecError for a
        value that does not fit its schema (nothing is produced then)."""
        full, payload = self.encode(topic, value)
        self.send_raw(full, key=key, value=payload, on_delivery=on_delivery)

    def encode(self, topic: str, value: Mapping[str, Any]) -> tuple[str, bytes]:
        """The full topic name and the bytes of `value` as the record of `topic`."""
        full = self.settings.topic(topic)
        return full, self.codec.encode(TOPIC_RECORDS[topic], value, topic=full)

    def send_raw(
        self,
        full_topic: str,
        *,
        key: str | bytes | None,
        value: bytes,
        on_delivery: OnDelivery | None = None,
        wait: bool = True,
    ) -> None:
        """Produce bytes as they are to a full topic name (replays, tests of bad input).

        With `wait` false, a full local queue raises BufferError for the caller to wait
        in its own way (an event loop must not block)."""
        report = self._report(on_delivery)
        while True:
            try:
                self.client.produce(
                    full_topic, key=_key_bytes(key), value=value, on_delivery=report
                )
                break
            except BufferError:
                if not wait:
                    raise
                # The local queue is full: backpressure, not an error. Serve delivery
                # reports (which frees the queue) and try again.
                self.client.poll(0.1)
            except KafkaException as exc:  # refused before sending: too large, say
                raise _delivery_error(full_topic, exc.args[0]) from None
        if self._poller is None:
            self.client.poll(0)

    def dead_letter(
        self,
        source: SourceRef,
        stage: str,
        error: BaseException,
        *,
        on_delivery: OnDelivery | None = None,
        **ids: Any,
    ) -> None:
        """Produce the DeadLetter of `error`, raised at `stage` on the record from `source`
        (`ids`: tweet_id, media_key, url, payload)."""
        letter = self.dead_letter_outgoing(source, stage, error, **ids)
        self.send("deadletter", letter.value, key=letter.key, on_delivery=on_delivery)

    @staticmethod
    def dead_letter_outgoing(
        source: SourceRef,
        stage: str,
        error: BaseException,
        *,
        tweet_id: str | None = None,
        media_key: str | None = None,
        url: str | None = None,
        payload: bytes | None = None,
    ) -> Outgoing:
        """The DeadLetter of `error` at `stage` (counted in the metrics), keyed by media key,
        tweet id or the source record's key, in that order."""
        metrics.DEAD_LETTERS.labels(stage=stage, cause=type(error).__name__).inc()
        letter = dead_letter(
            source_topic=source.topic,
            source_partition=source.partition,
            source_offset=source.offset,
            stage=stage,
            error=error,
            tweet_id=tweet_id,
            media_key=media_key,
            url=url,
            payload=payload,
        )
        key = media_key or tweet_id or (source.key or b"").decode("utf-8", "replace")
        return Outgoing("deadletter", key, dict(letter))

    # Asynchronous delivery ----------------------------------------------------------

    async def send_async(
        self, topic: str, value: Mapping[str, Any], *, key: str | bytes | None
    ) -> asyncio.Future[None]:
        """Produce like `send`, waiting asynchronously while librdkafka's local queue is
        full; the future settles with this record's delivery report (DeliveryError when
        it failed). Starts the poller thread on first use."""
        full, payload = self.encode(topic, value)
        return await self._send_raw_async(full, key, payload)

    async def _send_raw_async(
        self, full_topic: str, key: str | bytes | None, payload: bytes
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(error: Exception | None) -> None:
            loop.call_soon_threadsafe(_settle, future, error)

        self.start_polling()
        while True:
            try:
                self.send_raw(full_topic, key=key, value=payload, on_delivery=settle, wait=False)
                return future
            except BufferError:  # backpressure: the poller frees the queue meanwhile
                await asyncio.sleep(0.05)

    async def deliver(self, outgoing: list[Outgoing]) -> None:
        """Produce every record of `outgoing` and wait until all are delivered.

        Raises CodecError before producing anything when a value does not fit its schema,
        and DeliveryError when the broker did not take one."""
        encoded = [(self.encode(o.topic, o.value), o.key) for o in outgoing]
        futures = [
            await self._send_raw_async(full, key, payload) for (full, payload), key in encoded
        ]
        await asyncio.gather(*futures)

    def start_polling(self) -> None:
        """Serve delivery reports on a poller thread of this producer's own (idempotent), so
        `on_delivery` callbacks run there and producing never waits for them."""
        with self._lock:
            if self._poller is not None:
                return
            self._poller = threading.Thread(
                target=self._poll_loop, name="record-producer-poll", daemon=True
            )
            self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop_polling.is_set():
            self.client.poll(0.1)

    # Delivery reports ---------------------------------------------------------------

    def _report(self, on_delivery: OnDelivery | None) -> Callable[[Any, Any], None]:
        def report(err: Any, msg: Any) -> None:
            error = None
            topic = self._short.get(msg.topic(), "other")
            (metrics.RECORDS_PRODUCED if err is None else metrics.PRODUCE_FAILURES).labels(
                topic=topic
            ).inc()
            with self._lock:
                if err is None:
                    self.delivered += 1
                else:
                    error = _delivery_error(msg.topic(), err)
                    # A failure whose sender handles it (on_delivery) is its; one with no
                    # one to tell is kept for flush() to raise.
                    if on_delivery is None:
                        self.failed += 1
                        if self._first_error is None:
                            self._first_error = str(error)
            if error is not None:
                log.error("%s", error)
            if on_delivery is not None:
                on_delivery(error)

        return report

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery reports (when there is no poller thread)."""
        return self.client.poll(timeout_s)

    def raise_if_failed(self) -> None:
        """Raise DeliveryError if a delivery failed since the last call."""
        with self._lock:
            if self.failed:
                error, self.failed, self._first_error = self._first_error, 0, None
                raise DeliveryError(f"produce failed: {error}")

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every delivery report; raise if any record is undelivered or failed."""
        deadline = time.monotonic() + timeout_s
        remaining = self.client.flush(timeout_s)
        while remaining and time.monotonic() < deadline:
            remaining = self.client.flush(max(0.0, deadline - time.monotonic()))
        if remaining:
            raise DeliveryError(f"{remaining} records not delivered within {timeout_s:g} s")
        self.raise_if_failed()

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush, then stop the poller thread (and close the codec, if it made it)."""
        try:
            self.flush(timeout_s)
        finally:
            self._stop_polling.set()
            if self._poller is not None:
                self._poller.join(5)
            if self._owns_codec:
                self.codec.close()

    def __enter__(self) -> RecordProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
