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

Metrics (infra/metrics.py): tweets are counted as consumed and as admitted when that
happens; shed records, image events, retractions and cached results once they are
delivered, so those counts match the topics; the controller's state, the photos being
fetched and this worker's lag on `tweets` are published every second; ``/metrics`` and
``/healthz`` are pages of the worker's web server (`faust_web_port`). ``/healthz``
answers 503 once the agent has stopped (`AgentHealth`): a Faust worker whose agent
crashed keeps serving its pages but no longer takes a tweet in.

Every tweet taken in ends as exactly one of: ImageEvents for its photos (each photo then
a result or a dead letter downstream), a ShedRecord (`no_photo`, `over_capacity`,
`deadline`, `over_rate`: processors/admission.py), cached results (a photo seen before),
or a DeadLetter (undecodable record; a photo that cannot be fetched). A deletion (a Tweet
with ``operation`` delete: not a post) ends as one retraction on `hashtags`, which
withdraws the post's earlier results (schemas/records.py: `retraction`); a new version
of a post (``update``) is preceded by one, then goes on as any post.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from infra import metrics
from infra.exceptions import CodecError, FetchError, RegistryUnavailableError
from infra.fetcher import FetchedImage, ImageFetcher
from infra.inorder import InOrderWindow
from infra.record_producer import DeliveryError, Outgoing, RecordProducer, SourceRef
from infra.settings import Settings
from processors.admission import NO_PHOTO, Admission, AdmissionController
from processors.feedback import FeedbackReader
from processors.result_cache import CachedResult, ResultCache
from schemas.codec import Codec
from schemas.records import (
    Media,
    Tweet,
    hashtag_result,
    image_event,
    now_ms,
    photos,
    retraction,
    rule_tags,
    shed_record,
)

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

    def __init__(
        self,
        *,
        codec: Codec,
        fetcher: Fetcher,
        admission: AdmissionController,
        cache: ResultCache | None = None,
    ) -> None:
        self.codec = codec
        self.fetcher = fetcher
        self.admission = admission
        self.cache = cache

    @staticmethod
    def dead_letter(consumed: Consumed, stage: str, error: BaseException, **ids: Any) -> Outgoing:
        return RecordProducer.dead_letter_outgoing(consumed.source, stage, error, **ids)

    def _shed(
        self, tweet: Tweet, reason: str, detail: str, media_keys: list[str], admission: Admission
    ) -> Outgoing:
        state = admission.state
        high = self.admission.high_priority(rule_tags(tweet))
        record = shed_record(
            tweet=tweet,
            reason=reason,
            detail=detail,
            media_keys=media_keys,
            admission_rate=admission.tweet_rate,
            observed_rate=admission.observed_rate,
            tokens=admission.tokens,
            priority="" if reason == NO_PHOTO else ("high" if high else "low"),
            controller_mode=state.mode,
            capacity_images_per_s=state.capacity,
            backlog_images=state.backlog,
            estimated_delay_ms=state.delay_s * 1000.0,
            admitted_images_per_s=state.rate,
        )
        return Outgoing("tweets.shed", tweet["id"], record)

    def _cached(
        self, tweet: Tweet, photo: Media, entry: CachedResult, timestamps: dict[str, float]
    ) -> Outgoing:
        event = {
            "tweet_id": tweet["id"],
            "media_key": photo["media_key"],
            "url": photo["url"],
            "tweet_text": tweet["text"],
            "source": tweet.get("source"),
            "replay_run_id": tweet.get("replay_run_id"),
            "timestamps": timestamps,
        }
        result = hashtag_result(
            event=event,
            hashtags=entry.hashtags,
            top_class=entry.top_class,
            scores=entry.scores,
            model_id=entry.model_id,
            model_version=entry.model_version,
            thumbnail=entry.thumbnail,
            timestamps={"produced": now_ms()},
            cached=True,
        )
        return Outgoing("hashtags", tweet["id"], result)

    async def process(self, consumed: Consumed) -> list[Outgoing]:
        """Everything one consumed tweet produces.

        Decoding, the cache and admission run before the first await, so tweets are
        admitted in the order they were consumed even though their fetches overlap. A
        tweet is admitted or shed whole: its photos that the cache cannot answer need
        tokens for all of them.
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
            return [self._shed(tweet, NO_PHOTO, detail, [], self.admission.snapshot())]
        answered: dict[int, CachedResult] = {}
        if self.cache is not None:
            for position, photo in enumerate(tweet_photos):
                entry = self.cache.lookup(media_key=photo["media_key"], url=photo["url"])
                if entry is not None:
                    answered[position] = entry
        todo = len(tweet_photos) - len(answered)
        if todo:
            age_s = max(0.0, received - tweet["ingested_at_ms"]) / 1000.0
            admission = self.admission.admit(photos=todo, rule_tags=rule_tags(tweet), age_s=age_s)
            if not admission.admitted:
                keys = [p["media_key"] for p in tweet_photos]
                return [self._shed(tweet, admission.reason, admission.detail, keys, admission)]
        metrics.AGENT_ADMITTED.inc()
        admitted = now_ms()
        stamps = {"ingested": tweet["ingested_at_ms"], "received": received, "admitted": admitted}
        out: list[Outgoing] = []
        for position, entry in answered.items():
            self.cache.count(hit=True)  # type: ignore[union-attr]
            out.append(self._cached(tweet, tweet_photos[position], entry, stamps))
        self.admission.fetching += todo
        try:
            out += await asyncio.gather(
                *(
                    self._fetch_one(consumed, tweet, photo, position, stamps)
                    for position, photo in enumerate(tweet_photos)
                    if position not in answered
                )
            )
        finally:
            self.admission.fetching -= todo
        return out

    async def _fetch_one(
        self,
        consumed: Consumed,
        tweet: Tweet,
        photo: Media,
        position: int,
        stamps: dict[str, float],
    ) -> Outgoing:
        ids = {"tweet_id": tweet["id"], "media_key": photo["media_key"], "url": photo["url"]}
        started = now_ms()
        try:
            fetched = await self.fetcher.fetch(str(photo["url"]))
        except FetchError as exc:
            return self.dead_letter(consumed, "fetch", exc, **ids)
        done = now_ms()
        self.admission.observe_fetch((done - started) / 1000.0)
        timestamps = stamps | {"fetch_start": started, "fetched": done}
        if self.cache is not None:
            # The same bytes under another key and URL: a copy of a photo seen before.
            sha = hashlib.sha256(fetched.data).hexdigest()
            entry = self.cache.lookup(sha256=sha)
            self.cache.count(hit=entry is not None)
            if entry is not None:
                return self._cached(tweet, photo, entry, timestamps)
            self.cache.note_image(photo["media_key"], sha)
        event = image_event(
            tweet=tweet,
            photo=photo,
            position=position,
            content_type=fetched.content_type,
            image=fetched.data,
            timestamps=timestamps,
        )
        return Outgoing("images", photo["media_key"], event)


class AckableEvent(Protocol):
    """What `run_agent` needs of a stream event (Faust's `Event` is one)."""

    value: bytes
    key: bytes | None

    @property
    def message(self) -> Any: ...  # .topic, .partition, .offset, .tp

    def ack(self) -> Any: ...


async def process(
    stage: ShedAndFetch,
    consumed: Consumed,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> list[Outgoing]:
    """`stage.process(consumed)`, waiting out a schema registry that does not answer: the
    tweet is fine, so it must not become a dead letter (its ack waits meanwhile)."""
    delay = 0.5
    while True:
        try:
            return await stage.process(consumed)
        except RegistryUnavailableError as exc:
            log.warning("%s waits for the schema registry (%s); retrying in %.1f s",
                        consumed.source, exc, delay)  # fmt: skip
            await sleep(delay)
            delay = min(delay * 2, 30.0)


async def deliver(
    producer: RecordProducer,
    outgoing: list[Outgoing],
    consumed: Consumed,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> list[Outgoing]:
    """Deliver `outgoing`, waiting out a broker (or registry) that is away: a resend is
    harmless, the records are keyed. Output that can never be delivered (it cannot be
    encoded, or the broker refuses it for good: too large) is replaced, once, by a dead
    letter of the tweet without its bytes. Returns what was delivered."""
    delay = 0.5
    replaced = False
    while True:
        try:
            await producer.deliver(outgoing)
            return outgoing
        except (CodecError, DeliveryError) as exc:
            permanent = not isinstance(exc, DeliveryError) or exc.permanent
            if permanent and not replaced:
                log.error("the output of %s cannot be delivered: %s", consumed.source, exc)
                stage = "encode" if isinstance(exc, CodecError) else "deliver"
                outgoing = [ShedAndFetch.dead_letter(consumed, stage, exc)]
                replaced = True
                continue
            failure: Exception = exc
        except Exception as exc:  # the broker or the registry away (RegistryUnavailableError)
            failure = exc
        log.warning(
            "could not deliver the output of %s (%s); retrying in %.1f s",
            consumed.source, failure, delay,
        )  # fmt: skip
        await sleep(delay)
        delay = min(delay * 2, 30.0)


def count_delivered(outgoing: list[Outgoing]) -> None:
    """The metrics of one tweet's records, once delivered (dead letters are counted as
    they are built: infra/record_producer.py)."""
    for record in outgoing:
        if record.topic == "images":
            metrics.AGENT_IMAGES.inc()
        elif record.topic == "tweets.shed":
            metrics.AGENT_SHED.labels(reason=record.value["reason"]).inc()
        elif record.topic == "hashtags" and record.value.get("retraction"):
            metrics.AGENT_RETRACTIONS.inc()
        elif record.topic == "hashtags":
            metrics.AGENT_CACHED.inc()
            metrics.observe_result(record.value)


class AgentHealth:
    """What the worker's ``/healthz`` says: well while the agent runs, and while it has not
    yet started (a group's first join can take most of a session timeout); 503 once it
    has stopped, with the error it stopped on."""

    def __init__(self) -> None:
        self.started = 0
        self.running = False
        self.failure: str | None = None

    @contextmanager
    def run(self) -> Iterator[None]:
        """Wrap one run of the agent (Faust's supervisor may start it again after a crash)."""
        self.started += 1
        self.running, self.failure = True, None
        try:
            yield
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.running = False

    def report(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON body of ``/healthz``."""
        if not self.started:
            return 200, {"status": "starting"}
        if self.running:
            return 200, {"status": "ok", "agent_starts": self.started}
        body: dict[str, Any] = {"status": "failed" if self.failure else "stopped"}
        if self.failure:
            body["error"] = self.failure
        return 503, body


async def run_agent(
    events: AsyncIterable[AckableEvent],
    stage: ShedAndFetch,
    producer: RecordProducer,
    *,
    max_in_flight: int,
    max_unacked: int,
    read_offsets: dict[tuple[str, int], int] | None = None,
) -> None:
    """Process every event of `events`, acking each in offset order once delivered.
    `read_offsets` gets the last offset read of each partition (for the lag metric)."""
    in_flight = asyncio.Semaphore(max_in_flight)
    unacked = asyncio.Semaphore(max_unacked)
    window = InOrderWindow()
    tasks: set[asyncio.Task] = set()

    async def handle(event: AckableEvent, consumed: Consumed, pending: Any) -> None:
        try:
            try:
                outgoing = await process(stage, consumed)
            except Exception as exc:  # a bug must not lose the tweet: dead-letter it
                log.exception("unexpected error on %s", consumed.source)
                outgoing = [
                    stage.dead_letter(consumed, "shed_and_fetch", exc, payload=consumed.value)
                ]
            count_delivered(await deliver(producer, outgoing, consumed))
            # Delivered: the tweet is finished. Only now may it (and the finished tweets
            # after it on its partition) be acked.
            window.finish(pending)
        finally:
            in_flight.release()
            metrics.AGENT_IN_FLIGHT.dec()

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
            metrics.AGENT_CONSUMED.inc()
            metrics.AGENT_IN_FLIGHT.inc()
            if read_offsets is not None:
                read_offsets[(message.topic, message.partition)] = message.offset
            source = SourceRef(message.topic, message.partition, message.offset, event.key)
            # Tracked in consumption order, which is offset order per partition.
            pending = window.track((message.topic, message.partition), acker(event))
            task = asyncio.create_task(handle(event, Consumed(event.value, source), pending))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)


def admission_from_settings(settings: Settings) -> AdmissionController:
    """The admission controller the settings describe."""
    return AdmissionController(
        target_s=settings.latency_target_ms / 1000.0,
        ceiling_rate=settings.admission_rate,
        ceiling_burst=settings.admission_burst,
        mode=settings.admission_mode,
        fallback_rate=settings.admission_fallback_rate,
        queue_share=settings.admission_queue_share,
        drain_s=settings.admission_drain_s,
    )


class Feedback:
    """Capacity reports and results, read in a thread, applied on the agent's loop."""

    def __init__(
        self,
        settings: Settings,
        admission: AdmissionController,
        cache: ResultCache,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.cache = cache
        self.stale_ms = admission.stale_after_s * 1000.0
        self.model: tuple[Any, Any] | None = None
        self.reader = FeedbackReader(
            settings,
            on_capacity=lambda report, history: loop.call_soon_threadsafe(
                self.capacity, report, history
            ),
            on_result=lambda result: loop.call_soon_threadsafe(self.result, result),
        )

    def capacity(self, report: dict[str, Any], history: bool) -> None:
        # History (the compacted topic's old reports, read at start) counts only if it is
        # recent by the reporter's clock; every report after it is fresh as it arrives,
        # whatever the hosts' clocks say.
        if history and now_ms() - report["reported_at_ms"] > self.stale_ms:
            return
        self.admission.observe_capacity(
            report["consumer_id"],
            images_per_s=report["images_per_s"],
            queue_depth=report["queue_depth"],
            batch_size=report["batch_size"],
        )

    def result(self, result: dict[str, Any]) -> None:
        self.cache.add(result)
        model = (result.get("model_id"), result.get("model_version"))
        if result.get("scores") and not result.get("cached") and model != self.model:
            self.model = model  # the classes change only with the model
            self.admission.set_classes(result["scores"])


def publish_state(admission: AdmissionController) -> None:
    """The controller's state now, and the photos being fetched, into the metrics."""
    state = admission.snapshot().state
    metrics.ADMISSION_MODE.state(state.mode)
    metrics.ADMISSION_RATE.set(state.rate)
    metrics.ADMISSION_CAPACITY.set(state.capacity)
    metrics.ADMISSION_BACKLOG.set(state.backlog)
    metrics.ADMISSION_DELAY.set(state.delay_s)
    metrics.ADMISSION_SHARE.set(state.share)
    metrics.ADMISSION_CONSUMERS.set(state.consumers)
    metrics.FETCHING.set(admission.fetching)


async def publish_lag(
    app: Any, group: str, topic: str, read_offsets: dict[tuple[str, int], int]
) -> None:
    """This worker's lag on each of its partitions of `topic`: the high watermark of the
    last fetch less the next offset to read (from what the agent read, or the consumer's
    position before it read anything)."""
    lags: dict[tuple[str, int], int] = {}
    try:
        for tp in app.consumer.assignment():
            if tp.topic != topic:
                continue
            end = app.consumer.highwater(tp)
            last = read_offsets.get((tp.topic, tp.partition))
            position = last + 1 if last is not None else await app.consumer.position(tp)
            if end is not None and end >= 0 and position is not None and position >= 0:
                lags[(tp.topic, tp.partition)] = max(0, end - position)
    except Exception as exc:  # not started, or rebalancing: known next time
        log.debug("lag unavailable: %s", exc)
        return
    metrics.set_consumer_lag(group, lags)


def partition_share(app: Any, topic: str) -> float | None:
    """This worker's share of `topic`'s partitions, from the Faust consumer's assignment."""
    try:
        mine = sum(1 for tp in app.consumer.assignment() if tp.topic == topic)
        total = app.consumer.topic_partitions(topic)
    except Exception:  # not started, or rebalancing: the share is known next time
        return None
    return mine / total if total else None


def register_agent(app: Any, settings: Settings) -> None:
    """Put the `shed_and_fetch` agent on `app` (processors/app.py calls this)."""
    tweets_topic = settings.topic("tweets")
    tweets = app.topic(tweets_topic, value_serializer="raw", key_serializer="raw")
    codec = Codec.from_settings(settings)
    admission = admission_from_settings(settings)
    cache = ResultCache(max_entries=settings.result_cache_size, ttl_s=settings.result_cache_ttl_s)
    read_offsets: dict[tuple[str, int], int] = {}
    health = AgentHealth()
    metrics.expose(metrics.AGENT, metrics.FETCH)

    @app.page("/metrics")
    async def metrics_page(view: Any, request: Any) -> Any:
        body, content_type = metrics.exposition(request.headers.get("Accept", ""))
        return view.bytes(body, headers={"Content-Type": content_type})

    @app.page("/healthz")
    async def healthz_page(view: Any, request: Any) -> Any:
        status, body = health.report()
        return view.json(body, status=status)

    @app.timer(1.0)
    async def publish_metrics() -> None:
        publish_state(admission)
        await publish_lag(app, app.conf.id, tweets_topic, read_offsets)

    @app.timer(1.0)
    async def follow_the_share() -> None:
        # Each worker admits its share of the controller's rate: a rebalance (a worker
        # joining or leaving) moves partitions, and with them the shares.
        share = partition_share(app, tweets_topic)
        if share is not None and share != admission.share:
            log.info(
                "admitting %.0f%% of the pipeline's rate (partitions of %s)",
                share * 100,
                tweets_topic,
            )
            admission.set_share(share)

    @app.agent(tweets, name="shed_and_fetch")
    async def shed_and_fetch(stream: Any) -> None:
        with health.run():
            producer = RecordProducer(settings, codec=codec)
            feedback = Feedback(settings, admission, cache, asyncio.get_running_loop())
            feedback.reader.start()
            try:
                async with ImageFetcher.from_settings(settings) as fetcher:
                    stage = ShedAndFetch(
                        codec=codec, fetcher=fetcher, admission=admission, cache=cache
                    )
                    await run_agent(
                        stream.noack().events(),
                        stage,
                        producer,
                        max_in_flight=settings.agent_max_in_flight,
                        max_unacked=settings.agent_max_unacked,
                        read_offsets=read_offsets,
                    )
            finally:
                await asyncio.to_thread(feedback.reader.stop)
                await asyncio.to_thread(producer.close)
