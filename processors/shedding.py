"""The shedding and fetch stage: `tweets` in; `images`, `tweets.shed` and `deadletter` out.

Delivery guarantee: at-least-once. The agent takes events in batches
(`take_events`), and Faust acks them only after the batch's body has run; the
body awaits the delivery of every record it produced before it returns. A crash
in between re-delivers the batch: ImageEvents are keyed by media key and
results by tweet id, so downstream sees harmless duplicates, never gaps.

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

    def _dead(self, source: SourceRecord, stage: str, error: BaseException, **ids) -> Outgoing:
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

    async def process(self, batch: list[SourceRecord]) -> list[Outgoing]:
        """Everything the batch produces, in input order."""
        received = now_ms()
        out: list[Outgoing | None] = []
        fetches: list[tuple[int, SourceRecord, dict, dict, int, float]] = []
        for source in batch:
            try:
                tweet = self.codec.decode("Tweet", source.value)
            except CodecError as exc:
                out.append(self._dead(source, "decode_tweet", exc, payload=source.value))
                continue
            tweet_photos = photos(tweet)
            if not tweet_photos:
                kinds = sorted({m["type"] for m in tweet["media"]}) or ["none"]
                out.append(
                    self._shed(
                        tweet,
                        "no_photo",
                        "media: " + ",".join(kinds),
                        [],
                        self.admission.snapshot(),
                    )
                )
                continue
            admission = self.admission.admit()
            if not admission.admitted:
                keys = [p["media_key"] for p in tweet_photos]
                out.append(self._shed(tweet, "over_rate", "token bucket empty", keys, admission))
                continue
            admitted = now_ms()
            for position, photo in enumerate(tweet_photos):
                out.append(None)  # filled in once the fetch is done, to keep input order
                fetches.append((len(out) - 1, source, tweet, photo, position, admitted))
        results = await asyncio.gather(
            *(self._fetch_one(s, t, p, pos, received, adm) for _, s, t, p, pos, adm in fetches)
        )
        for (slot, *_), outgoing in zip(fetches, results, strict=True):
            out[slot] = outgoing
        return [o for o in out if o is not None]

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
            return self._dead(source, "fetch", exc, **ids)
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


def _register_agent() -> None:
    from processors.app import app, settings
    from processors.fetch import ImageFetcher

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
        async with ImageFetcher.from_settings(settings) as fetcher:
            stage = ShedAndFetch(
                settings=settings, codec=codec, fetcher=fetcher, admission=admission
            )
            async for events in stream.take_events(
                settings.agent_batch, within=settings.agent_batch_within_s
            ):
                batch = [
                    SourceRecord(
                        e.value, e.key, e.message.topic, e.message.partition, e.message.offset
                    )
                    for e in events
                ]
                outgoing = await stage.process(batch)
                pending = [
                    await by_full_name[o.topic].send(key=o.key, value=o.value) for o in outgoing
                ]
                # Delivered before Faust acks the batch: at-least-once.
                await asyncio.gather(*pending)
                log.info("batch of %d tweets -> %d records", len(batch), len(outgoing))


_register_agent()
