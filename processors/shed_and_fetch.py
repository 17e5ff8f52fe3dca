"""The shedding and fetch stage: `tweets` in; `images`, `tweets.shed` and `deadletter` out.

`ShedAndFetch` is the stage's logic, free of Faust and Kafka: one consumed tweet in, the
records it becomes out. `run_agent` is the loop the Faust agent runs (registered on the
app by `register_agent`), free of Faust too: it takes any stream of events that can be
acked.

Delivery guarantee: at-least-once, and this module owns it rather than Faust:
- each tweet is handled in a task of its own, and its task ends only once every record
  it produced (image events, a shed record or dead letters) has been delivered, through
  the one RecordProducer; a broker that is away is waited for, never given up on;
- a tweet is acked to Faust only when its task and the tasks of every tweet consumed
  before it on the same partition have ended (infra/inorder.py), so the acked offsets
  Faust commits from are always one contiguous run after its committed offset, and the
  committed offset never passes a tweet still in flight. Faust's own handling of
  out-of-order acks is not relied on (faust-streaming issue #606 commits past a record
  in flight);
- a crash at any moment re-delivers every tweet after the committed offset: ImageEvents
  are keyed by media key and results by tweet id, so downstream sees harmless
  duplicates, never gaps.
In-flight work is bounded by `agent_max_in_flight` (released as each tweet finishes, so
a slow photo does not hold up the tweets behind it: their work proceeds, only their acks
wait) and the finished-but-unacked tweets by `agent_max_unacked` (released as they are
acked).

Every tweet taken in ends as exactly one of: ImageEvents for its photos (each photo then
a result or a dead letter downstream), a ShedRecord (`no_photo`, `over_rate`), or a
DeadLetter (undecodable record; a photo that cannot be fetched). A deletion (a Tweet
with ``operation`` delete: not a post) ends as one retraction on `hashtags`, which
withdraws the post's earlier results (schemas/records.py: `retraction`); a new version
of a post (``update``) is preceded by one, then goes on as any post.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from infra.exceptions import CodecError, FetchError
from infra.fetcher import FetchedImage, ImageFetcher
from infra.inorder import InOrderWindow
from infra.record_producer import Outgoing, RecordProducer, SourceRef
from infra.settings import Settings
from processors.admission import Admission, AdmissionController
from schemas.codec import Codec
from schemas.records import Media, Tweet, image_event, now_ms, photos, retraction, shed_record

log = logging.getLogger(__name__)


class Fetcher(Protocol):
    async def fetch(self, url: str) -> FetchedImage: ...


@dataclass(frozen=True, slots=True)
class Consumed:
    """A consumed record: its bytes and where it came from (for dead letters)."""

    value: bytes
    source: SourceRef


class ShedAndFetch:
    """The stage's logic, free of Faust and Kafka so that it can be tested on its own."""

    def __init__(self, *, codec: Codec, fetcher: Fetcher, admission: AdmissionController) -> None:
        self.codec = codec
        self.fetcher = fetcher
        self.admission = admission

    @staticmethod
    def dead_letter(consumed: Consumed, stage: str, error: BaseException, **ids: Any) -> Outgoing:
        letter = RecordProducer.dead_letter_record(consumed.source, stage, error, **ids)
        key = ids.get("media_key") or ids.get("tweet_id") or (consumed.source.key or b"")
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        return Outgoing("deadletter", key, letter)

    @staticmethod
    def _shed(
        tweet: Tweet, reason: str, detail: str, media_keys: list[str], admission: Admission
    ) -> Outgoing:
        record = shed_record(
            tweet=tweet,
            reason=reason,
            detail=detail,
            media_keys=media_keys,
            admission_rate=admission.admission_rate,
            observed_rate=admission.observed_rate,
            tokens=admission.tokens,
        )
        return Outgoing("tweets.shed", tweet["id"], record)

    async def process(self, consumed: Consumed) -> list[Outgoing]:
        """Everything one consumed tweet produces.

        Decoding and admission run before the first await, so tweets are admitted
        in the order they were consumed even though their fetches overlap.
        """
        received = now_ms()
        try:
            tweet: Tweet = self.codec.decode("Tweet", consumed.value)  # type: ignore[assignment]
        except CodecError as exc:
            return [self.dead_letter(consumed, "decode_tweet", exc, payload=consumed.value)]
        if tweet["operation"] in ("update", "delete"):
            # Before any result of this version: a consumer that reads the retraction
            # first still keeps them (they were ingested with it, not before it).
            withdrawn = retraction(tweet=tweet, timestamps={"received": received})
            retracted = [Outgoing("hashtags", tweet["id"], withdrawn)]
            if tweet["operation"] == "delete":
                return retracted
            return retracted + await self._post(consumed, tweet, received)
        return await self._post(consumed, tweet, received)

    async def _post(self, consumed: Consumed, tweet: Tweet, received: float) -> list[Outgoing]:
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
                    self._fetch_one(consumed, tweet, photo, position, received, admitted)
                    for position, photo in enumerate(tweet_photos)
                )
            )
        )

    async def _fetch_one(
        self,
        consumed: Consumed,
        tweet: Tweet,
        photo: Media,
        position: int,
        received: float,
        admitted: float,
    ) -> Outgoing:
        ids = {"tweet_id": tweet["id"], "media_key": photo["media_key"], "url": photo["url"]}
        started = now_ms()
        try:
            fetched = await self.fetcher.fetch(str(photo["url"]))
        except FetchError as exc:
            return self.dead_letter(consumed, "fetch", exc, **ids)
        event = image_event(
            tweet=tweet,
            photo=photo,
            position=position,
            content_type=fetched.content_type,
            image=fetched.data,
            timestamps={
                "ingested": tweet["ingested_at_ms"],
                "received": received,
                "admitted": admitted,
                "fetch_start": started,
                "fetched": now_ms(),
            },
        )
        return Outgoing("images", photo["media_key"], event)


class AckableEvent(Protocol):
    """What `run_agent` needs of a stream event (Faust's `Event` is one)."""

    value: bytes
    key: bytes | None

    @property
    def message(self) -> Any: ...  # .topic, .partition, .offset, .tp

    def ack(self) -> Any: ...


async def deliver(
    producer: RecordProducer,
    outgoing: list[Outgoing],
    consumed: Consumed,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> None:
    """Deliver `outgoing`, waiting out a broker that is away (a resend is harmless: the
    records are keyed). A record that cannot be encoded becomes a dead letter."""
    delay = 0.5
    while True:
        try:
            await producer.deliver(outgoing)
            return
        except CodecError as exc:  # a bug, not bad input: keep the tweet, as a dead letter
            log.exception("cannot encode the output of %s", consumed.source)
            outgoing = [ShedAndFetch.dead_letter(consumed, "encode", exc, payload=consumed.value)]
        except Exception as exc:
            log.warning(
                "could not deliver the output of %s (%s); retrying in %.1f s",
                consumed.source, exc, delay,
            )  # fmt: skip
            await sleep(delay)
            delay = min(delay * 2, 30.0)


async def run_agent(
    events: AsyncIterable[AckableEvent],
    stage: ShedAndFetch,
    producer: RecordProducer,
    *,
    max_in_flight: int,
    max_unacked: int,
) -> None:
    """Process every event of `events`, acking each in offset order once delivered."""
    in_flight = asyncio.Semaphore(max_in_flight)
    unacked = asyncio.Semaphore(max_unacked)
    window = InOrderWindow()
    tasks: set[asyncio.Task] = set()

    async def handle(event: AckableEvent, consumed: Consumed, pending: Any) -> None:
        try:
            try:
                outgoing = await stage.process(consumed)
            except Exception as exc:  # a bug must not lose the tweet: dead-letter it
                log.exception("unexpected error on %s", consumed.source)
                outgoing = [
                    stage.dead_letter(consumed, "shed_and_fetch", exc, payload=consumed.value)
                ]
            await deliver(producer, outgoing, consumed)
            # Delivered: the tweet is finished. Only now may it (and the finished tweets
            # after it on its partition) be acked.
            window.finish(pending)
        finally:
            in_flight.release()

    def acker(event: AckableEvent) -> Callable[[], None]:
        def ready() -> None:
            event.ack()
            unacked.release()

        return ready

    try:
        async for event in events:
            await unacked.acquire()
            await in_flight.acquire()
            message = event.message
            source = SourceRef(message.topic, message.partition, message.offset, event.key)
            # Tracked in consumption order, which is offset order per partition.
            pending = window.track((message.topic, message.partition), acker(event))
            task = asyncio.create_task(handle(event, Consumed(event.value, source), pending))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)


def register_agent(app: Any, settings: Settings) -> None:
    """Put the `shed_and_fetch` agent on `app` (processors/app.py calls this)."""

    tweets = app.topic(settings.topic("tweets"), value_serializer="raw", key_serializer="raw")
    codec = Codec.from_settings(settings)
    admission = AdmissionController(rate=settings.admission_rate, burst=settings.admission_burst)

    @app.agent(tweets, name="shed_and_fetch")
    async def shed_and_fetch(stream: Any) -> None:
        producer = RecordProducer(settings, codec=codec)
        try:
            async with ImageFetcher.from_settings(settings) as fetcher:
                stage = ShedAndFetch(codec=codec, fetcher=fetcher, admission=admission)
                await run_agent(
                    stream.noack().events(),
                    stage,
                    producer,
                    max_in_flight=settings.agent_max_in_flight,
                    max_unacked=settings.agent_max_unacked,
                )
        finally:
            await asyncio.to_thread(producer.close)
