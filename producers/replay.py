"""Replay archived tweets onto `tweets`, keeping their original timing (or faster).

`ReplaySource` is a tweet source (producers/source.py) over one of two inputs: a stream
archive (producers/archive.py: raw lines with receive times, or plain JSON-lines files),
whose lines go through the parser of their format (`ARCHIVE_PARSERS`: X API v2 lines
through `tweet_from_stream_line`, another source's through its own), so that posts and
deletions come back as they were produced; or a Kafka topic of Tweet
records (an archived `tweets`), read without joining a group, by `assign()` between two
bounds (or to the end of each partition, as a fetch reports it) and decoded. Either way
each tweet is produced to ``settings.topic("tweets")`` with ``source = "replay"``, a
fresh ``ingested_at_ms`` and the run's ``replay_run_id``, keyed by tweet id; what is not
a tweet goes to `deadletter` with stage ``replay``.

Bounds: `start` inclusive, `stop` exclusive; an offset (archive line index, or offset in
each partition) or a time. A time bound selects by the archive's receive time, or by a
topic record's timestamp (every record has one, Tweet or not): records before the start
are skipped, and the first at or after the stop ends its partition. For a topic the time
bounds are checked on the records as they are read; ``offsets_for_times`` only picks
where to start reading, because tansu ignores its time and answers the earliest offset.

Timing: each item carries its time and the pump sends record *i* ``(t_i - t_0) / speed``
after the first, by an absolute schedule; ``max`` never waits. Times are
the archive's receive times, or for a topic the Tweet's ``ingested_at_ms`` (the record's
timestamp when that is missing). A topic's partitions are merged by that time, each kept
in offset order, so the order per key is kept. The merge streams: each partition is read
ahead at most about `READ_AHEAD` records (its fetching paused beyond that), so a topic
range of any size replays in bounded memory.

Delivery guarantee: at-least-once per run. The producer is idempotent, so its retries
never duplicate, and everything is flushed before `replay` returns (it raises if a
delivery failed). Running a replay twice produces the tweets twice, told apart by their
``replay_run_id``.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from infra.exceptions import BrokerError, CodecError, ConfigurationError
from infra.kafka import consumed, consumer_config, wait_for_broker
from infra.record_producer import SourceRef
from infra.settings import Settings
from infra.tail import parse_time
from producers import bluesky, mastodon, synthetic
from producers.archive import archive_files, read_archive
from producers.source import Rejected, SourceItem, TweetSource, iterate_in_thread, run_source
from producers.tweets import tweet_from_stream_line
from schemas.codec import Codec
from schemas.records import Tweet, now_ms

log = logging.getLogger(__name__)

#: A bound of a replay: an offset (archive line index, or offset in each partition of a
#: topic) or a time. `start` is inclusive, `stop` exclusive.
Bound = int | datetime

#: Seconds without any message before a topic read gives up on reaching its end.
READ_IDLE_TIMEOUT_S = 10.0

#: Records a topic replay reads ahead per partition before pausing its fetching.
READ_AHEAD = 1000

#: How an archived line of each format (producers/archive.py; None: an X API v2 line)
#: becomes a Tweet record. Each takes the line and ``source``, ``ingested_at_ms`` and
#: ``replay_run_id``, and raises CodecError for a line it cannot read.
ARCHIVE_PARSERS: dict[str | None, Callable[..., Tweet]] = {
    None: tweet_from_stream_line,
    bluesky.BlueskySource.archive_format: bluesky.tweet_from_archived,
    mastodon.MastodonSource.archive_format: mastodon.tweet_from_archived,
    synthetic.SyntheticSource.archive_format: synthetic.tweet_from_archived,
}


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
        return parse_time(text)
    except ConfigurationError:
        raise ConfigurationError(
            f"bound {text!r}: expected an offset (integer) or an ISO 8601 time"
        ) from None


def _ms(when: datetime) -> float:
    return when.timestamp() * 1000.0


@dataclass
class _Item:
    """One thing to replay: a stream line or a decoded Tweet, or bytes that are neither."""

    t_ms: float | None
    line: dict[str, Any] | None = None
    line_format: str | None = None
    tweet: dict[str, Any] | None = None
    raw: bytes | None = None
    error: str = ""
    where: SourceRef = SourceRef("")


def _archive_items(
    path: Path, start: Bound | None, stop: Bound | None
) -> Generator[_Item, None, None]:

    source = f"archive:{path}"
    # A line without a receive time goes with its predecessor: skipped before the start
    # time is reached, like a topic record without a timestamp.
    started = not isinstance(start, datetime)
    for index, (t_ms, line, line_format) in enumerate(read_archive(path)):
        if isinstance(start, int) and index < start:
            continue
        if isinstance(stop, int) and index >= stop:
            return
        if t_ms is None:
            if not started:
                continue
        else:
            if isinstance(start, datetime) and t_ms < _ms(start):
                continue
            started = True
            if isinstance(stop, datetime) and t_ms >= _ms(stop):
                return
        where = SourceRef(source, -1, index)
        if isinstance(line, bytes):
            yield _Item(t_ms, raw=line, error="archived line is not a JSON object", where=where)
        else:
            yield _Item(t_ms, line=line, line_format=line_format, where=where)


@dataclass
class _Partition:
    """The read of one partition of a topic replay: its bounds and what is read ahead."""

    next: int  # the next offset wanted; anything below is a re-fetch, dropped
    end: int | None  # exclusive offset bound; None = the end of the partition
    started: bool  # reached the start time (always, without one)
    buffer: deque[_Item] = field(default_factory=deque)
    last_t: float | None = None  # time of the latest item, for one without a time
    paused: bool = False
    done: bool = False


def _topic_ranges(
    consumer: Any, topic: str, start: Bound | None, stop: Bound | None
) -> dict[int, _Partition]:
    """Where to read each partition of `topic` (those with something to read)."""

    metadata = consumer.list_topics(topic, timeout=10)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise ConfigurationError(f"topic {topic!r} does not exist")
    seek: dict[int, int] = {}
    if isinstance(start, datetime):
        asked = [TopicPartition(topic, p, int(_ms(start))) for p in sorted(info.partitions)]
        # -1: no record at or after the time. An error: read from the low watermark.
        seek = {
            tp.partition: tp.offset
            for tp in consumer.offsets_for_times(asked, 10)
            if tp.error is None
        }
    parts: dict[int, _Partition] = {}
    for p in sorted(info.partitions):
        low, _ = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        first = max(low, 0)
        if isinstance(start, int):
            first = max(first, start)
        elif p in seek:
            if seek[p] < 0:
                continue
            first = max(first, seek[p])
        end = stop if isinstance(stop, int) else None
        if end is None or first < end:
            parts[p] = _Partition(next=first, end=end, started=not isinstance(start, datetime))
    return parts


def _topic_items(
    settings: Settings, topic: str, start: Bound | None, stop: Bound | None
) -> Generator[_Item, None, None]:
    """The records of `topic` between the bounds, merged over its partitions by time.

    Streams: a partition is read ahead at most about `READ_AHEAD` records (its fetching
    is paused beyond that), and an item is yielded once every partition that has not
    reached its end has one buffered, so the merge never waits on an unread record.
    Time bounds are checked on every record's timestamp as it is read (the start is
    inclusive, the first record at or after the stop ends its partition);
    ``offsets_for_times`` only picks where reading starts, since a broker may answer it
    loosely (tansu answers the earliest offset for any time).
    """

    codec = Codec.from_settings(settings)
    start_ms = _ms(start) if isinstance(start, datetime) else None
    stop_ms = _ms(stop) if isinstance(stop, datetime) else None
    # No group: assign() reads from given offsets and nothing is ever committed.
    consumer = Consumer(
        consumer_config(
            settings,
            f"tagstream-replay-{uuid.uuid4().hex[:8]}",
            **{
                # The end of a partition is where a fetch says it is: tansu's ListOffsets
                # high watermark lags behind (measured), a fetch response's does not.
                "enable.partition.eof": True,
                # A start past the end reads nothing rather than the whole partition.
                "auto.offset.reset": "latest",
            },
        )
    )
    try:
        try:
            parts = _topic_ranges(consumer, topic, start, stop)
        except KafkaException as e:
            raise BrokerError(f"topic {topic!r}: no answer from the broker: {e}") from None
        if not parts:
            return
        consumer.assign([TopicPartition(topic, p, part.next) for p, part in parts.items()])

        # heads: (time, partition) of each partition's first buffered item; hungry: the
        # partitions not at their end with nothing buffered, which the merge waits for.
        heads: list[tuple[float, int]] = []
        hungry = set(parts)

        def finish(p: int) -> None:
            parts[p].done = True
            hungry.discard(p)
            consumer.pause([TopicPartition(topic, p)])

        def end_of(eof: Any) -> None:
            # The EOF event comes before the messages of its batch are taken: its offset
            # is where the partition ends, which may still be ahead of what was taken.
            part = parts.get(eof.partition())
            if part is None or part.done:
                return
            if part.next >= eof.offset():
                finish(eof.partition())
            else:
                part.end = eof.offset() if part.end is None else min(part.end, eof.offset())

        def take(message: Any) -> None:
            p = message.partition()
            part = parts.get(p)
            if part is None or part.done or message.offset() < part.next:
                return
            keep(message, part)
            # Kept or skipped (before the start time), a record may be the last one.
            if not part.done and part.end is not None and part.next >= part.end:
                finish(p)

        def keep(message: Any, part: _Partition) -> None:
            p, offset = message.partition(), message.offset()
            if part.end is not None and offset >= part.end:
                finish(p)
                return
            part.next = offset + 1
            _, stamp = message.timestamp()
            stamp_ms = float(stamp) if stamp > 0 else None
            where = SourceRef(topic, p, offset, message.key())
            value = message.value() or b""
            try:
                tweet = codec.decode("Tweet", value)
            except CodecError as e:
                item = _Item(stamp_ms, raw=value, error=str(e), where=where)
            else:
                item = _Item(tweet.get("ingested_at_ms") or stamp_ms, tweet=tweet, where=where)
            # Bounds are on the record's time: every record has one, Tweet or not.
            bound_ms = stamp_ms if stamp_ms is not None else item.t_ms
            if start_ms is not None:
                if bound_ms is None:
                    if not part.started:
                        return
                elif bound_ms < start_ms:
                    return
                part.started = True
            if stop_ms is not None and bound_ms is not None and bound_ms >= stop_ms:
                finish(p)
                return
            # A missing time counts as its predecessor's, so a partition stays in order.
            if item.t_ms is None:
                item.t_ms = part.last_t
            else:
                part.last_t = item.t_ms
            if not part.buffer:
                heapq.heappush(heads, (item.t_ms or 0.0, p))
                hungry.discard(p)
            part.buffer.append(item)
            if len(part.buffer) >= READ_AHEAD and not part.paused:
                consumer.pause([TopicPartition(topic, p)])
                part.paused = True

        idle_since: float | None = None
        while True:
            if hungry:
                messages = consumed(consumer, min(500, READ_AHEAD), 0.5, on_eof=end_of)
                if not messages and hungry:
                    now = time.monotonic()
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since > READ_IDLE_TIMEOUT_S:
                        raise BrokerError(
                            f"topic {topic!r}: partitions {sorted(hungry)} did not reach "
                            f"their end within {READ_IDLE_TIMEOUT_S:g} s"
                        )
                    continue
                idle_since = None
                for message in messages:
                    take(message)
                continue
            if not heads:
                return
            _, p = heapq.heappop(heads)
            part = parts[p]
            item = part.buffer.popleft()
            if part.buffer:
                heapq.heappush(heads, (part.buffer[0].t_ms or 0.0, p))
            elif not part.done:
                hungry.add(p)
            if part.paused and not part.done and len(part.buffer) <= READ_AHEAD // 2:
                consumer.resume([TopicPartition(topic, p)])
                part.paused = False
            yield item
    finally:
        consumer.close()


class ReplaySource(TweetSource):
    """An archive (file or folder) or a Kafka topic of Tweets, as a tweet source.

    Tweets get ``source = "replay"`` and the run's ``replay_run_id``; stream lines go
    through `tweet_from_stream_line`; what is not a tweet is `Rejected` (stage
    ``replay``) with where it came from. Items carry their original time, so the pump
    paces them at `speed`."""

    name = "replay"
    dead_letter_stage = "replay"

    def __init__(
        self,
        settings: Settings,
        *,
        archive: Path | None = None,
        topic: str | None = None,
        start: Bound | None = None,
        stop: Bound | None = None,
        speed: str | float = "1x",
        run_id: str | None = None,
    ) -> None:
        if (archive is None) == (topic is None):
            raise ConfigurationError("replay needs exactly one of an archive path or a topic")
        self.speed = parse_speed(speed)
        self.run_id = run_id or uuid.uuid4().hex
        if archive is not None:
            archive_files(Path(archive))  # raises FileNotFoundError before any connection
        self.settings = settings
        self.archive = Path(archive) if archive is not None else None
        self.topic = topic
        self.start = start
        self.stop = stop

    def _raw_items(self) -> Generator[_Item, None, None]:
        if self.archive is not None:
            return _archive_items(self.archive, self.start, self.stop)
        return _topic_items(self.settings, str(self.topic), self.start, self.stop)

    async def items(self) -> AsyncIterator[SourceItem]:
        async for item in iterate_in_thread(self._raw_items()):
            yield self._item(item)

    def _item(self, item: _Item) -> SourceItem:
        tweet = item.tweet
        if tweet is None and item.line is not None:
            parse = ARCHIVE_PARSERS.get(item.line_format)
            if parse is None:
                error = f"archived line of unknown format {item.line_format!r:.40}"
                rejected = Rejected(json.dumps(item.line).encode(), error, item.where)
                return SourceItem(rejected=rejected, t_ms=item.t_ms)
            try:
                tweet = parse(
                    item.line,
                    source=self.name,
                    ingested_at_ms=now_ms(),
                    replay_run_id=self.run_id,
                )
            except CodecError as e:
                raw = json.dumps(item.line).encode()
                return SourceItem(rejected=Rejected(raw, str(e), item.where), t_ms=item.t_ms)
        if tweet is None:
            rejected = Rejected(item.raw or b"", item.error, item.where)
            return SourceItem(rejected=rejected, t_ms=item.t_ms)
        tweet = dict(tweet, source=self.name, replay_run_id=self.run_id)  # type: ignore[assignment]
        return SourceItem(tweet=tweet, t_ms=item.t_ms)


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
    receive time (archive) or record timestamp (topic). A missing archive raises
    FileNotFoundError, a missing topic ConfigurationError, before anything is sent.
    `speed` divides the original gaps (``"10x"``), ``"max"`` sends without waiting.
    `run_id` defaults to a uuid4 hex. `clock` (seconds, monotonic) and `sleep` (blocking)
    are injectable for tests. Returns the counts with the run id; everything is flushed
    before returning.
    """
    source = ReplaySource(
        settings,
        archive=archive,
        topic=topic,
        start=start,
        stop=stop,
        speed=speed,
        run_id=run_id,
    )

    wait_for_broker(settings)  # after the checks above: a bad argument fails at once

    async def wait(seconds: float) -> None:
        # A blocking sleep is what tests inject; the replay's loop has nothing else to do.
        sleep(seconds)

    counts = ReplayCounts(asyncio.run(run_source(settings, source, clock=clock, sleep=wait)))
    counts.run_id = source.run_id
    log.info("replay %s: %s", counts.run_id, dict(counts))
    return counts
