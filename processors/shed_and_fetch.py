"""The shedding and fetch stage: `tweets` in; `images`, `tweets.shed` and `deadletter` out.

Delivery guarantee: at-least-once, and this module owns it rather than Faust:
- each tweet is handled in a task of its own, and its task ends only once every record
  it produced (image events, a shed record or dead letters) has been delivered;
- a tweet is acked to Faust only when its task and the tasks of every tweet consumed
  before it on the same partition have ended (`processors.ack_window.InOrderAcks`), so
  the acked offsets Faust commits from are always one contiguous run and the committed
  offset never passes a tweet still in flight. Faust's own handling of out-of-order
  acks is not relied on (faust-streaming issue #606 commits past a record in flight);
- a crash at any moment re-delivers every tweet after the committed offset: ImageEvents
  are keyed by media key and results by tweet id, so downstream sees harmless
  duplicates, never gaps.
In-flight work is bounded by `agent_max_in_flight` (released as each tweet finishes, so
a slow photo does not hold up the tweets behind it: their work proceeds, only their acks
wait) and the finished-but-unacked tweets by `agent_max_unacked`.

Every tweet taken in ends as exactly one of: ImageEvents for its photos (each
photo then a result or a dead letter downstream), a ShedRecord (`no_photo`,
`over_rate`), or a DeadLetter (undecodable record; a photo that cannot be fetched).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from infra.exceptions import CodecError, FetchError
from infra.settings import Settings
from processors.ack_window import InOrderAcks
from processors.admission import AdmissionController
from producers.tweets import photos
from schemas.codec import Codec
from schemas.records import dead_letter, now_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRecord:
    """A consumed record and where it came from (for dead letters)."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes
    value: bytes


class ShedAndFetch:
    """The stage's logic, free of Faust so that it can be tested on its own."""

    def __init__(
        self, *, settings: Settings, codec: Codec, fetcher, admission: AdmissionController
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.fetcher = fetcher
        self.admission = admission
        self.images_topic = settings.topic("images")
        self.shed_topic = settings.topic("tweets.shed")
        self.dead_topic = settings.topic("deadletter")

    def _encode(self, topic: str, record: str, key: str, value: dict) -> Outgoing:
        return Outgoing(topic, key.encode(), self.codec.encode(record, value, topic=topic))

    def dead_letter_record(
        self, source: SourceRecord, stage: str, error: BaseException, **ids
    ) -> Outgoing:
        letter = dead_letter(
            source_topic=source.topic,
            source_partition=source.partition,
            source_offset=source.offset,
            stage=stage,
            error=error,
            **ids,
        )
        key = (
            ids.get("media_key")
            or ids.get("tweet_id")
            or (source.key or b"").decode("utf-8", "replace")
        )
        return self._encode(self.dead_topic, "DeadLetter", key, letter)

    def _shed(
        self, tweet: dict, reason: str, detail: str, media_keys: list[str], admission
    ) -> Outgoing:
        record = {
            "tweet_id": tweet["id"],
            "reason": reason,
            "detail": detail,
            "media_keys": media_keys,
            "admission_rate": admission.admission_rate,
            "observed_rate": admission.observed_rate,
            "tokens": admission.tokens,
            "source": tweet.get("source", "unknown"),
            "replay_run_id": tweet.get("replay_run_id"),
            "shed_at_ms": now_ms(),
        }
        return self._encode(self.shed_topic, "ShedRecord", tweet["id"], record)

    async def process(self, source: SourceRecord) -> list[Outgoing]:
        """Everything one consumed tweet produces.

        Decoding and admission run before the first await, so tweets are admitted
        in the order they were consumed even though their fetches overlap.
        """
        received = now_ms()
        try:
            tweet = self.codec.decode("Tweet", source.value)
        except CodecError as exc:
            return [self.dead_letter_record(source, "decode_tweet", exc, payload=source.value)]
        tweet_photos = photos(tweet)
        if not tweet_photos:
            kinds = sorted({m["type"] for m in tweet["media"]}) or ["none"]
            detail = "media: " + ",".join(kinds)
            return [self._shed(tweet, "no_photo", detail, [], self.admission.snapshot())]
        admission = self.admission.admit()
        if not admission.admitted:
            keys = [p["media_key"] for p in tweet_photos]
            return [self._shed(tweet, "over_rate", "token bucket empty", keys, admission)]
        admitted = now_ms()
        return list(
            await asyncio.gather(
                *(
                    self._fetch_one(source, tweet, photo, position, received, admitted)
                    for position, photo in enumerate(tweet_photos)
                )
            )
        )

    async def _fetch_one(
        self,
        source: SourceRecord,
        tweet: dict,
        photo: dict,
        position: int,
        received: float,
        admitted: float,
    ) -> Outgoing:
        ids = {"tweet_id": tweet["id"], "media_key": photo["media_key"], "url": photo["url"]}
        started = now_ms()
        try:
            fetched = await self.fetcher.fetch(photo["url"])
        except FetchError as exc:
            return self.dead_letter_record(source, "fetch", exc, **ids)
        event = {
            "tweet_id": tweet["id"],
            "media_key": photo["media_key"],
            "url": photo["url"],
            "position": position,
            "tweet_text": tweet["text"],
            "matching_rules": [r["tag"] or r["id"] for r in tweet["matching_rules"]],
            "content_type": fetched.content_type,
            "image": fetched.data,
            "source": tweet.get("source", "unknown"),
            "replay_run_id": tweet.get("replay_run_id"),
            "timestamps": {
                "ingested": tweet["ingested_at_ms"],
                "received": received,
                "admitted": admitted,
                "fetch_start": started,
                "fetched": now_ms(),
            },
        }
        return self._encode(self.images_topic, "ImageEvent", photo["media_key"], event)


def register_agent(app, settings: Settings) -> None:
    """Put the `shed_and_fetch` agent on `app` (processors/app.py calls this)."""
    from infra.fetcher import ImageFetcher

    tweets = app.topic(settings.topic("tweets"), value_serializer="raw", key_serializer="raw")
    outputs = {
        name: app.topic(settings.topic(name), value_serializer="raw", key_serializer="raw")
        for name in ("images", "tweets.shed", "deadletter")
    }
    by_full_name = {topic.get_topic_name(): topic for topic in outputs.values()}
    codec = Codec.from_settings(settings)
    admission = AdmissionController(rate=settings.admission_rate, burst=settings.admission_burst)

    @app.agent(tweets, name="shed_and_fetch")
    async def shed_and_fetch(stream):
        # One tweet's slow photo must not hold the tweets behind it: each tweet is a
        # task. Its ack goes through the in-order window (see the module docstring);
        # the semaphore bounds the work in flight, the window the acks waiting.
        in_flight = asyncio.Semaphore(settings.agent_max_in_flight)
        acks = InOrderAcks(max_unacked=settings.agent_max_unacked)
        tasks: set[asyncio.Task] = set()

        async def deliver(outgoing: list[Outgoing], source: SourceRecord) -> None:
            # A tweet is never acked undelivered, and never given up on: a broker that is
            # away is waited for (the records are keyed, so a resend is harmless).
            delay = 0.5
            while True:
                try:
                    sends = [
                        await by_full_name[o.topic].send(key=o.key, value=o.value) for o in outgoing
                    ]
                    await asyncio.gather(*sends)
                    return
                except Exception as exc:
                    log.warning(
                        "could not deliver the output of %s[%d]@%d (%s); retrying in %.1f s",
                        source.topic, source.partition, source.offset, exc, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

        async def handle(stage: ShedAndFetch, event, pending) -> None:
            try:
                message = event.message
                source = SourceRecord(
                    event.value, event.key, message.topic, message.partition, message.offset
                )
                try:
                    outgoing = await stage.process(source)
                except Exception as exc:  # a bug must not lose the tweet: dead-letter it
                    log.exception("unexpected error on %s", source)
                    outgoing = [
                        stage.dead_letter_record(
                            source, "shed_and_fetch", exc, payload=source.value
                        )
                    ]
                await deliver(outgoing, source)
                # Delivered: the tweet is finished. Only then may it (and the finished
                # tweets after it on its partition) be acked.
                acks.finish(pending)
            finally:
                in_flight.release()

        async with ImageFetcher.from_settings(settings) as fetcher:
            stage = ShedAndFetch(
                settings=settings, codec=codec, fetcher=fetcher, admission=admission
            )
            try:
                async for event in stream.noack().events():
                    await acks.reserve()
                    await in_flight.acquire()
                    # Tracked in consumption order, which is offset order per partition.
                    pending = acks.track(event.message.tp, event.ack)
                    task = asyncio.create_task(handle(stage, event, pending))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                await asyncio.gather(*tasks, return_exceptions=True)
