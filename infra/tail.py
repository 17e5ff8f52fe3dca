"""`tagstream tail`: any tagstream topic, decoded, one line per record, for a terminal.

Each record becomes one line: by default ``partition@offset time key value`` with the value
as compact JSON, with ``--json`` one JSON object (topic, partition, offset, timestamp,
key, value) for tools such as jq. Bytes fields show as their size (``"<2048 bytes>"``),
never their content; a record that does not decode is a line with its error and size in
place of the value, so a bad record never stops the tail.

Where reading starts, in every partition: at the end (new records only, the default), at
the beginning, at an offset, or at a time. Neither end nor time trusts the broker's
offset lookups, which the embedded broker (tansu) answers loosely: its high watermark can
lag behind the last batch, and it answers ``offsets_for_times`` with the earliest offset
whatever the time. So the end is where the first fetch reports it (a partition EOF), and
records before it are skipped; a time keeps the records whose own timestamp is at or
after it, checked as each is read. It then follows until `limit` records are printed or
`stop` is set (Ctrl-C).

Delivery: read-only. It reads by ``assign()`` without joining a consumer group and
commits nothing, so it never moves any group's position.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from infra.exceptions import BrokerError, CodecError, ConfigurationError
from infra.kafka import consumed, consumer_config
from infra.settings import TOPIC_NAMES, Settings
from infra.topics import TOPIC_RECORDS
from schemas.codec import Codec

#: Where a tail starts in every partition: the end, the beginning, an offset or a time.
Start = Literal["end", "beginning"] | int | datetime


def parse_time(text: str) -> datetime:
    """An ISO 8601 time, UTC when it names no zone."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigurationError(
            f"{text!r} is not an ISO 8601 time (like 2024-05-13T18:04:11Z)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def resolve_topic(settings: Settings, name: str) -> str:
    """The short name of one of our topics, given its short or full name."""
    for short in TOPIC_NAMES:
        if name in (short, settings.topic(short)):
            return short
    raise ConfigurationError(f"unknown topic {name!r}; tagstream topics: {', '.join(TOPIC_NAMES)}")


def shown(value: Any) -> Any:
    """``value`` with every bytes field replaced by its size."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {k: shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown(v) for v in value]
    return value


def _key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return key.hex()


@dataclass(frozen=True)
class TailLine:
    """One record as the tail shows it: where it is, when, its key, and value or error."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: str | None
    value: Any = None
    error: str | None = None
    size: int = 0

    @property
    def time(self) -> str | None:
        if self.timestamp_ms is None:
            return None
        when = datetime.fromtimestamp(self.timestamp_ms / 1000.0, UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def as_dict(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.time,
            "key": self.key,
        }
        if self.error is None:
            line["value"] = self.value
        else:
            line["error"] = self.error
            line["size"] = self.size
        return line

    def render(self, *, as_json: bool) -> str:
        if as_json:
            return json.dumps(self.as_dict(), ensure_ascii=False)
        body = (
            json.dumps(self.value, ensure_ascii=False)
            if self.error is None
            else f"error: {self.error} ({self.size} bytes)"
        )
        return f"{self.partition}@{self.offset} {self.time or '-'} key={self.key} {body}"


def tail_line(message: Any, record: str, codec: Codec) -> TailLine:
    """The line of one consumed message holding a ``record``."""
    kind, stamp = message.timestamp()
    data = message.value() or b""
    where = {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp_ms": stamp if stamp > 0 else None,
        "key": _key(message.key()),
    }
    try:
        return TailLine(**where, value=shown(codec.decode(record, data)))
    except CodecError as exc:
        return TailLine(**where, error=str(exc), size=len(data))


def _starts(consumer: Any, topic: str, start: Start) -> list[TopicPartition]:
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    except KafkaException as exc:
        raise BrokerError(f"topic {topic!r}: no answer from the broker: {exc}") from None
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise ConfigurationError(
            f"topic {topic!r} does not exist on the cluster; `tagstream topics` creates it"
        )
    partitions = sorted(metadata.partitions)
    if start == "end":
        return [TopicPartition(topic, p, OFFSET_END) for p in partitions]
    if start == "beginning":
        return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
    if isinstance(start, int):
        starts = []
        for p in partitions:
            low, _ = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            starts.append(TopicPartition(topic, p, max(start, low, 0)))
        return starts
    ms = int(start.timestamp() * 1000)
    asked = [TopicPartition(topic, p, ms) for p in partitions]
    found = {tp.partition: tp.offset for tp in consumer.offsets_for_times(asked, 10)}
    # -1: nothing at or after the time yet, so the end; no answer: the beginning.
    return [
        TopicPartition(topic, p, OFFSET_END if found.get(p) == -1 else found.get(p, -2))
        for p in partitions
    ]


def tail(
    settings: Settings,
    topic: str,
    *,
    start: Start = "end",
    limit: int | None = None,
    as_json: bool = False,
    out: TextIO,
    stop: threading.Event | None = None,
    codec: Codec | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Print the records of ``topic`` (a short or full name) from ``start`` to ``out``
    until ``limit`` are printed or ``stop`` is set; returns how many were printed.

    ``on_ready`` is called once reading is set up: from the end, once every partition's
    end is known, so a record produced after it is shown and none before it."""
    short = resolve_topic(settings, topic)
    full = settings.topic(short)
    record = TOPIC_RECORDS[short]
    codec = codec or Codec.from_settings(settings)
    since_ms = int(start.timestamp() * 1000) if isinstance(start, datetime) else None
    consumer = Consumer(
        consumer_config(
            settings,
            f"tagstream-tail-{uuid.uuid4().hex[:8]}",  # required by librdkafka; never joined
            **{
                # An offset past the end waits there for new records, rather than rewinding.
                "auto.offset.reset": "latest",
                # Where a fetch says a partition ends: see "the end" above.
                "enable.partition.eof": True,
            },
        )
    )
    printed = 0
    # At the end: the first EOF of each partition says where the records before the
    # tail end; until every partition has reported one, the tail is not ready.
    ends: dict[int, int] = {}

    def reached(eof: Any) -> None:
        ends.setdefault(eof.partition(), eof.offset())

    try:
        assignment = _starts(consumer, full, start)
        consumer.assign(assignment)
        ready = start != "end"
        if ready and on_ready is not None:
            on_ready()
        while (limit is None or printed < limit) and not (stop is not None and stop.is_set()):
            messages = consumed(consumer, 100, 0.5, on_eof=reached)
            if not ready and len(ends) == len(assignment):
                ready = True
                if on_ready is not None:
                    on_ready()
            for message in messages:
                if start == "end" and message.offset() < ends.get(message.partition(), 2**63):
                    continue
                _, stamp = message.timestamp()
                if since_ms is not None and stamp < since_ms:
                    continue
                out.write(tail_line(message, record, codec).render(as_json=as_json) + "\n")
                out.flush()
                printed += 1
                if limit is not None and printed >= limit:
                    break
    finally:
        consumer.close()
    return printed
