"""Replay archived tweets onto `tweets`, keeping their original timing (or faster).

Two sources: a stream archive (producers/archive.py: raw v2 lines with receive times,
or plain JSON-lines files), whose lines go through `tweet_from_stream_line`; or a Kafka
topic of Tweet records (an archived `tweets`), read without joining a group, by
`assign()` between two bounds (or to the end of each partition, as a fetch reports it)
and decoded. Either way each tweet is produced to
``settings.topic("tweets")`` with ``source = "replay"``, a fresh ``ingested_at_ms`` and
the run's ``replay_run_id``, keyed by tweet id; what is not a tweet goes to `deadletter`
with stage ``replay``.

Timing: record *i* is sent ``(t_i - t_0) / speed`` after the first, by an absolute
schedule (a late send does not delay the ones after it); ``max`` never waits. Times are
the archive's receive times, or for a topic the Tweet's ``ingested_at_ms`` (the record's
timestamp when that is missing). A topic's partitions are merged by that time, each kept
in offset order, so the order per key is kept. A topic range is read into memory first.

Delivery guarantee: at-least-once per run. The producer is idempotent, so its retries
never duplicate, and everything is flushed before `replay` returns (it raises if a
delivery failed). Running a replay twice produces the tweets twice, told apart by their
``replay_run_id``.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.exceptions import BrokerError, CodecError, ConfigurationError
from infra.settings import Settings
from producers.kafka import TweetProducer

log = logging.getLogger(__name__)

#: A bound of a replay: an offset (archive line index, or offset in each partition of a
#: topic) or a time. `start` is inclusive, `stop` exclusive.
Bound = int | datetime

#: Seconds without any message before a topic read gives up on reaching its end.
READ_IDLE_TIMEOUT_S = 10.0


class ReplayCounts(Counter[str]):
    """The counts of a replay (``tweets``, ``dead_letters``, ...) and its `run_id`."""

    run_id: str = ""


def parse_speed(speed: str | float) -> float | None:
    """``"10x"``, ``"0.5x"``, ``"2"`` or ``"max"`` as a factor; None for max (no waiting)."""
    if isinstance(speed, int | float) and not isinstance(speed, bool):
        factor = float(speed)
    else:
        text = str(speed).strip().lower()
        if text == "max":
            return None
        try:
            factor = float(text[:-1] if text.endswith("x") else text)
        except ValueError:
            raise ConfigurationError(
                f"speed {speed!r}: expected like '1x', '10x' or 'max'"
            ) from None
    if not factor > 0 or factor == float("inf"):
        raise ConfigurationError(f"speed {speed!r}: must be a positive factor")
    return factor


def parse_bound(text: str) -> Bound:
    """``"42"`` as the offset 42; anything else as an ISO 8601 time (UTC when naive)."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"bound {text!r}: expected an offset (integer) or an ISO 8601 time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _ms(when: datetime) -> float:
    return when.timestamp() * 1000.0


@dataclass
class _Item:
    """One thing to replay: a stream line or a decoded Tweet, or bytes that are neither."""

    t_ms: float | None
    line: dict[str, Any] | None = None
    tweet: dict[str, Any] | None = None
    raw: bytes | None = None
    error: str = ""
    where: tuple[str, int, int] = ("", -1, -1)  # source topic, partition, offset


def _archive_items(path: Path, start: Bound | None, stop: Bound | None) -> Iterator[_Item]:
    from producers.archive import read_archive

    source = f"archive:{path}"
    for index, (t_ms, line) in enumerate(read_archive(path)):
        if isinstance(start, int) and index < start:
            continue
        if isinstance(stop, int) and index >= stop:
            return
        if t_ms is not None:
            if isinstance(start, datetime) and t_ms < _ms(start):
                continue
            if isinstance(stop, datetime) and t_ms >= _ms(stop):
                return
        where = (source, -1, index)
        if isinstance(line, bytes):
            yield _Item(t_ms, raw=line, error="archived line is not a JSON object", where=where)
        else:
            yield _Item(t_ms, line=line, where=where)


def _topic_items(
    settings: Settings, topic: str, start: Bound | None, stop: Bound | None
) -> Iterator[_Item]:
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from infra.kafka import client_config
    from schemas.codec import Codec

    codec = Codec.from_settings(settings)
    # No group: assign() reads from given offsets and nothing is ever committed.
    consumer = Consumer(
        client_config(settings)
        | {
            "group.id": f"tagstream-replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": settings.fetch_wait_max_ms,
            "fetch.message.max.bytes": 16_000_000,
            # The end of a partition is where a fetch says it is: tansu's ListOffsets
            # high watermark lags behind (measured), a fetch response's does not.
            "enable.partition.eof": True,
            # A start past the end reads nothing rather than the whole partition.
            "auto.offset.reset": "latest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise ConfigurationError(f"topic {topic!r} not found")
        partitions = sorted(info.partitions)

        def by_time(bound: datetime) -> dict[int, int]:
            asked = [TopicPartition(topic, p, int(_ms(bound))) for p in partitions]
            return {tp.partition: tp.offset for tp in consumer.offsets_for_times(asked, 10)}

        # Per partition: [first, end); end None = up to the end of the partition.
        ranges: dict[int, tuple[int, int | None]] = {}
        start_at = by_time(start) if isinstance(start, datetime) else {}
        stop_at = by_time(stop) if isinstance(stop, datetime) else {}
        for p in partitions:
            low, _ = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            first: int = max(low, 0)
            end: int | None = None
            if isinstance(start, int):
                first = max(first, start)
            elif isinstance(start, datetime):
                if start_at.get(p, -1) < 0:
                    continue  # nothing at or after the start time
                first = start_at[p]
            if isinstance(stop, int):
                end = stop
            elif stop_at.get(p, -1) >= 0:
                end = stop_at[p]
            if end is None or first < end:
                ranges[p] = (first, end)
        if not ranges:
            return
        consumer.assign([TopicPartition(topic, p, first) for p, (first, _) in ranges.items()])
        got: dict[int, list[_Item]] = {p: [] for p in ranges}
        left = set(ranges)
        idle_since = time.monotonic()
        while left:
            messages = consumer.consume(500, timeout=0.5)
            if not messages and time.monotonic() - idle_since > READ_IDLE_TIMEOUT_S:
                raise BrokerError(
                    f"topic {topic!r}: partitions {sorted(left)} did not reach their end "
                    f"within {READ_IDLE_TIMEOUT_S:g} s"
                )
            for message in messages:
                idle_since = time.monotonic()
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        left.discard(message.partition())
                    else:
                        log.warning("replay read %s: %s", topic, error)
                    continue
                p, offset = message.partition(), message.offset()
                end = ranges[p][1]
                if p not in left or (end is not None and offset >= end):
                    left.discard(p)
                    continue
                where = (topic, p, offset)
                _, stamp = message.timestamp()
                value = message.value() or b""
                try:
                    tweet = codec.decode("Tweet", value)
                except CodecError as e:
                    got[p].append(
                        _Item(
                            float(stamp) if stamp > 0 else None,
                            raw=value,
                            error=str(e),
                            where=where,
                        )
                    )
                else:
                    t_ms = tweet.get("ingested_at_ms") or (float(stamp) if stamp > 0 else None)
                    got[p].append(_Item(t_ms, tweet=tweet, where=where))
                if end is not None and offset + 1 >= end:
                    left.discard(p)
    finally:
        consumer.close()
    last: dict[int, float] = {}

    def key(item: _Item) -> float:
        # A partition's items stay in offset order whatever their times: heapq.merge keeps
        # each input's order, and a missing time counts as its predecessor's.
        return item.t_ms if item.t_ms is not None else 0.0

    for p, items in got.items():
        for item in items:
            if item.t_ms is None and p in last:
                item.t_ms = last[p]
            if item.t_ms is not None:
                last[p] = item.t_ms
    yield from heapq.merge(*got.values(), key=key)


def replay(
    settings: Settings,
    *,
    archive: Path | None = None,
    topic: str | None = None,
    start: Bound | None = None,
    stop: Bound | None = None,
    speed: str | float = "1x",
    run_id: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
) -> ReplayCounts:
    """Re-produce an archive (file or folder) or a Kafka topic of Tweets onto `tweets`.

    Exactly one of `archive` and `topic` (a full topic name, on the settings' cluster).
    `start` (inclusive) and `stop` (exclusive) bound what is replayed: an int is a line
    index of the archive or an offset in every partition of the topic, a datetime a
    receive time (archive) or record time (topic). `speed` divides the original gaps
    (``"10x"``), ``"max"`` sends without waiting. `run_id` defaults to a uuid4 hex.
    `clock` (seconds, monotonic) and `sleep` are injectable for tests. Returns the counts
    with the run id; everything is flushed before returning.
    """
    if (archive is None) == (topic is None):
        raise ConfigurationError("replay needs exactly one of an archive path or a topic")
    factor = parse_speed(speed)
    counts = ReplayCounts()
    counts.run_id = run_id or uuid.uuid4().hex
    items: Iterable[_Item] = (
        _archive_items(Path(archive), start, stop)
        if archive is not None
        else _topic_items(settings, str(topic), start, stop)
    )
    sender = TweetProducer(settings)
    try:
        _run(items, sender, counts, factor=factor, clock=clock, sleep=sleep)
    finally:
        sender.flush()
    log.info("replay %s: %s", counts.run_id, dict(counts))
    return counts


def _run(
    items: Iterable[_Item],
    sender: TweetProducer,
    counts: ReplayCounts,
    *,
    factor: float | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Any],
) -> None:
    from producers.tweets import tweet_from_stream_line
    from schemas.records import now_ms

    t0: float | None = None
    began = 0.0
    for item in items:
        if factor is not None and item.t_ms is not None:
            if t0 is None:
                t0, began = item.t_ms, clock()
            else:
                delay = began + (item.t_ms - t0) / 1000.0 / factor - clock()
                if delay > 0:
                    sleep(delay)
                    counts["waits"] += 1
        tweet = item.tweet
        if tweet is None and item.line is not None:
            try:
                tweet = tweet_from_stream_line(
                    item.line, source="replay", ingested_at_ms=now_ms(), replay_run_id=counts.run_id
                )
            except CodecError as e:
                sender.dead_letter(
                    json.dumps(item.line).encode(), e, stage="replay", source=item.where
                )
                counts["dead_letters"] += 1
                continue
        if tweet is None:
            sender.dead_letter(
                item.raw or b"", CodecError(item.error), stage="replay", source=item.where
            )
            counts["dead_letters"] += 1
            continue
        tweet = dict(tweet, source="replay", ingested_at_ms=now_ms(), replay_run_id=counts.run_id)
        try:
            sender.send(tweet)
        except CodecError as e:
            sender.dead_letter(
                json.dumps(tweet, default=str).encode(), e, stage="replay", source=item.where
            )
            counts["dead_letters"] += 1
            continue
        counts["tweets"] += 1
