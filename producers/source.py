"""The tweet-source seam: a source yields tweets, `pump` produces them.

A source is a small class (`TweetSource`) that owns only what is specific to where its
posts come from: connecting, reading, turning what it reads into Tweet records
(schemas/records.py) and saying what it could not turn into one (`Rejected`). The X API
filtered stream (producers/xapi.py), Bluesky's Jetstream (producers/bluesky.py), Mastodon's
streaming API (producers/mastodon.py), synthetic demo traffic (producers/synthetic.py) and
archive or topic replay (producers/replay.py) are sources. Everything else is the pump's,
written once:

- pacing: an item may carry a time (``t_ms``); the pump sends item *i* ``(t_i - t_0) /
  speed`` after the first, on an absolute schedule (a late send does not delay the ones
  after it), no pause longer than `MAX_PAUSE_S`. Live sources give no time and are never
  held back;
- production through the one RecordProducer (infra/record_producer.py): idempotent,
  keyed by tweet id, with backpressure; ``ingested_at_ms`` is stamped as each tweet is
  handed to it;
- dead letters for `Rejected` input, with its bytes and where it came from;
- what a source read and left out on purpose (a skip: a post without photos, one that
  matched no filter, another collection) is counted by reason, and still moves the
  resume position on;
- dropping repeats of recent posts (`TweetSource.repeats`: a stream that replays posts
  after a reconnect), by tweet id, operation and revision, so that a new version or the
  deletion of a post is not taken for a repeat;
- counting new posts (``tweets``), new versions (``updates``) and deletions
  (``deletes``) apart: a deletion is not a post, and it ends as a retraction of the
  post's results (docs/sources.md), not as a result, a shed record or a dead letter;
- the raw archive of what was read (``--archive``: producers/archive.py), each line
  tagged with the source's `archive_format` so that replay knows how to read it back;
- counters (returned, and as metrics: infra/metrics.py, ``tagstream_source_*``; dead
  letters are counted as they are built), a progress line every few seconds, and a clean
  stop (read no more, flush);
- resume positions: when a source gives items a ``position``, the pump hands the
  newest position whose item, and every item before it, was delivered to a
  `PositionFile`, so a restart resumes there (`TweetSource.start_after`).

Delivery guarantee: at-least-once from the source onwards, when the source can resume
(a restart repeats at most what was produced after the last saved position, which the
pump saves every `SAVE_EVERY_S` seconds and at a stop); a source that cannot resume
(the X stream) loses what it read but had not handed over when the process is killed.

To add a source: subclass `TweetSource`, set `name` (the Tweet's ``source`` field) and
`dead_letter_stage`, write `items()`; then give it a `tagstream produce` subcommand in
tagstream/cli.py that builds it and calls `run_source`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from infra import metrics
from infra.exceptions import CodecError, ConfigurationError
from infra.inorder import InOrderWindow
from infra.record_producer import RecordProducer, SourceRef
from infra.settings import Settings
from schemas.records import Tweet, now_ms

if TYPE_CHECKING:
    from producers.archive import StreamArchive

log = logging.getLogger(__name__)

#: The longest pause between two paced items (after scaling by the speed): an archive's
#: gap of hours is replayed as this.
MAX_PAUSE_S = 60.0

#: Seconds between two saves of the resume position, and between two progress lines.
SAVE_EVERY_S = 1.0
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input that never became a Tweet: dead-lettered with its bytes and the reason."""

    raw: bytes
    error: str
    where: SourceRef


@dataclass(frozen=True, slots=True)
class SourceItem:
    """What a source yields: a tweet, a rejected input, or the reason it skipped what it
    read (``skipped``: nothing is produced), with what the pump needs.

    ``t_ms``: the item's time, for pacing (None: send at once). ``position``: where a
    restart resumes once this item and all before it are delivered (JSON-serialisable;
    None: no resume). ``raw``: what was read, for the archive (a parsed line or bytes).
    """

    tweet: Tweet | None = None
    rejected: Rejected | None = None
    skipped: str | None = None
    t_ms: float | None = None
    position: Any = None
    raw: dict[str, Any] | bytes | None = None

    def __post_init__(self) -> None:
        if [self.tweet, self.rejected, self.skipped].count(None) != 2:
            raise ValueError("a SourceItem holds one of a tweet, a rejected input or a skip")


class TweetSource(abc.ABC):
    """A source of tweets: yields `SourceItem`s; the pump does everything else."""

    #: The Tweet's ``source`` field: twitter, synthetic, replay, ...
    name: ClassVar[str]
    #: The ``stage`` of dead letters for `Rejected` input.
    dead_letter_stage: ClassVar[str]
    #: Recent posts (tweet id, operation, revision) to remember and drop repeats of
    #: (0: none).
    repeats: ClassVar[int] = 0
    #: The tag of this source's raw lines in an archive: which parser reads them back
    #: (producers/replay.py); None for X API v2 stream lines.
    archive_format: ClassVar[str | None] = None
    #: Whether the pump should pace items by their ``t_ms``, and at what speed (None: max).
    speed: float | None = None

    @abc.abstractmethod
    def items(self) -> AsyncIterator[SourceItem]:
        """The items, for as long as the source has them (an async generator)."""

    def start_after(self, position: Any) -> None:  # noqa: B027 - optional hook
        """Resume after `position`, the last one saved; sources without resume ignore it."""


class PositionFile:
    """A source's resume position in a small JSON file, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> Any:
        """The saved position, or None when there is none yet."""
        try:
            return json.loads(self.path.read_text())["position"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"resume position {self.path}: unreadable: {e}") from None

    def save(self, position: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"position": position, "saved_at_ms": now_ms()}))
        os.replace(tmp, self.path)


class _Positions:
    """The newest position whose item and every item before it were delivered."""

    def __init__(self, store: PositionFile) -> None:
        self.store = store
        self.window = InOrderWindow()
        self._lock = threading.Lock()
        self._latest: Any = None
        self._saved: Any = None
        self.failure: Exception | None = None

    def track(self, position: Any) -> Callable[[Exception | None], None]:
        def ready() -> None:
            with self._lock:
                self._latest = position

        pending = self.window.track("source", ready)

        def delivered(error: Exception | None) -> None:
            if error is None:  # a failed delivery never lets the position pass it
                self.window.finish(pending)
            elif self.failure is None:
                self.failure = error

        return delivered

    def save(self) -> None:
        with self._lock:
            latest = self._latest
        if latest is not None and latest != self._saved:
            self.store.save(latest)
            self._saved = latest


async def pump(
    source: TweetSource,
    producer: RecordProducer,
    *,
    stop: asyncio.Event | None = None,
    max_tweets: int | None = None,
    archive: StreamArchive | None = None,
    positions: PositionFile | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Counter[str]:
    """Produce the tweets of `source` until it ends, `max_tweets` are sent, or `stop`.

    Returns the counts (``tweets``, ``updates``, ``deletes``, ``dead_letters``,
    ``duplicates``, ``skipped`` and ``skipped_<reason>``, ``waits``, ``archived``, ...).
    Everything produced is flushed before returning; the resume position (with
    `positions`) is saved then too.
    """
    counts: Counter[str] = Counter(tweets=0, dead_letters=0)
    metrics.expose(metrics.SOURCE)
    tracker = _Positions(positions) if positions is not None else None
    if positions is not None:
        saved = positions.load()
        if saved is not None:
            source.start_after(saved)
            log.info("%s: resuming after position %s", source.name, saved)
    reader = asyncio.create_task(
        _read(source, producer, counts, max_tweets, archive, tracker, clock, sleep)
    )
    waits: set[asyncio.Task] = {reader}
    if stop is not None:
        waits.add(asyncio.create_task(stop.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        # Blocking flush off the loop: it waits for every delivery report.
        await asyncio.to_thread(producer.flush)
        if tracker is not None:
            tracker.save()
    if not reader.cancelled() and reader.exception() is not None:
        raise reader.exception()  # type: ignore[misc]
    log.info("%s: %s", source.name, summary(counts))
    return counts


async def _read(
    source: TweetSource,
    producer: RecordProducer,
    counts: Counter[str],
    max_tweets: int | None,
    archive: StreamArchive | None,
    tracker: _Positions | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[Any]],
) -> None:
    recent: OrderedDict[tuple[str, str, str | None], None] = OrderedDict()
    t0: float | None = None
    began = 0.0
    last_save = last_progress = started = clock()
    async with contextlib.aclosing(source.items()) as items:
        async for item in items:
            if source.speed is not None and item.t_ms is not None:
                if t0 is None:
                    t0, began = item.t_ms, clock()
                else:
                    delay = began + (item.t_ms - t0) / 1000.0 / source.speed - clock()
                    if delay > MAX_PAUSE_S:
                        # A stream that stood still for a day is not replayed as a day
                        # of silence: the pause is shortened, the schedule moved up.
                        log.info("%s: a pause of %.0f s shortened to %g s",
                                 source.name, delay, MAX_PAUSE_S)  # fmt: skip
                        began -= delay - MAX_PAUSE_S
                        delay = MAX_PAUSE_S
                        counts["pauses_shortened"] += 1
                    if delay > 0:
                        await sleep(delay)
                        counts["waits"] += 1
            metrics.SOURCE_READ.labels(source=source.name).inc()
            if archive is not None and item.raw is not None:
                archive.write(item.raw, line_format=source.archive_format)
                counts["archived"] += 1
            delivered = None
            if tracker is not None and item.position is not None:
                delivered = tracker.track(item.position)
            if item.skipped is not None:
                counts["skipped"] += 1
                counts[f"skipped_{item.skipped}"] += 1
                metrics.SOURCE_SKIPPED.labels(source=source.name, reason=item.skipped).inc()
                if delivered is not None:
                    delivered(None)
            elif item.rejected is not None:
                _reject(source, producer, item.rejected, counts, delivered)
            else:
                assert item.tweet is not None
                tweet_id = item.tweet["id"]
                operation = item.tweet.get("operation") or "create"
                seen = (tweet_id, operation, item.tweet.get("revision"))
                if source.repeats and seen in recent:
                    counts["duplicates"] += 1
                    metrics.SOURCE_DUPLICATES.labels(source=source.name).inc()
                    if delivered is not None:
                        delivered(None)
                else:
                    if source.repeats:
                        recent[seen] = None
                        if len(recent) > source.repeats:
                            recent.popitem(last=False)
                    tweet = dict(item.tweet, ingested_at_ms=now_ms())
                    try:
                        producer.send("tweets", tweet, key=tweet_id, on_delivery=delivered)
                    except CodecError as e:
                        raw = json.dumps(tweet, default=str).encode()
                        where = SourceRef(source.name)
                        _reject(source, producer, Rejected(raw, str(e), where), counts, delivered)
                    else:
                        counts[_COUNTED_AS.get(operation, "tweets")] += 1
                        metrics.SOURCE_PRODUCED.labels(
                            source=source.name, operation=operation
                        ).inc()
            now = clock()
            if now - last_save >= SAVE_EVERY_S:
                # Serve delivery reports, and stop at a record the broker did not take
                # (it was away longer than the producer's delivery timeout): going on
                # would lose it; a restart resumes before it, where the source can.
                producer.poll(0)
                producer.raise_if_failed()
                if tracker is not None:
                    if tracker.failure is not None:
                        raise tracker.failure
                    tracker.save()
                last_save = now
            if now - last_progress >= PROGRESS_EVERY_S:
                rate = counts["tweets"] / max(now - started, 1e-9)
                log.info("%s: %s (%.1f tweets/s)", source.name, summary(counts), rate)
                last_progress = now
            if max_tweets is not None and counts["tweets"] >= max_tweets:
                return


#: The count each operation of a produced Tweet goes to.
_COUNTED_AS = {"create": "tweets", "update": "updates", "delete": "deletes"}


def _reject(
    source: TweetSource,
    producer: RecordProducer,
    rejected: Rejected,
    counts: Counter[str],
    delivered: Callable[[Exception | None], None] | None,
) -> None:
    producer.dead_letter(
        rejected.where,
        source.dead_letter_stage,
        CodecError(rejected.error),
        payload=rejected.raw,
        on_delivery=delivered,
    )
    counts["dead_letters"] += 1


def summary(counts: Counter[str]) -> str:
    """Counts as one line: ``deletes=1, tweets=4, ...`` (sorted by name)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


async def run_source(
    settings: Settings,
    source: TweetSource,
    *,
    stop: asyncio.Event | None = None,
    max_tweets: int | None = None,
    archive: StreamArchive | None = None,
    positions: PositionFile | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Counter[str]:
    """`pump` with a RecordProducer of `settings`, closed at the end."""
    producer = RecordProducer(settings)
    try:
        return await pump(
            source,
            producer,
            stop=stop,
            max_tweets=max_tweets,
            archive=archive,
            positions=positions,
            clock=clock,
            sleep=sleep,
        )
    finally:
        producer.close()


async def iterate_in_thread(items: Iterator[Any], *, chunk: int = 256) -> AsyncIterator[Any]:
    """The items of a blocking iterator, read `chunk` at a time in a worker thread.

    One thread of its own reads and, at the end, closes the iterator: a read still
    running when the reader is cancelled finishes before the close starts (a generator
    may not be closed while another thread runs it)."""
    done = object()
    loop = asyncio.get_running_loop()
    worker = ThreadPoolExecutor(1, thread_name_prefix="source-read")

    def take() -> list[Any]:
        out = []
        for _ in range(chunk):
            item = next(items, done)
            if item is done:
                out.append(done)
                break
            out.append(item)
        return out

    try:
        while True:
            for item in await loop.run_in_executor(worker, take):
                if item is done:
                    return
                yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            await loop.run_in_executor(worker, close)
        worker.shutdown(wait=False)
