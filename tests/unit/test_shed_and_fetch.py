"""The shedding/fetch stage's decisions, with a fake fetcher (no Kafka, no Faust), and the
agent loop's in-order acks with fake events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from infra.exceptions import CodecError, RegistryUnavailableError, RejectedFetchError
from infra.fetcher import FetchedImage
from infra.record_producer import Outgoing, SourceRef
from processors.admission import AdmissionController
from processors.result_cache import ResultCache
from processors.shed_and_fetch import AgentHealth, Consumed, ShedAndFetch, run_agent
from schemas.codec import Codec
from schemas.records import now_ms
from tests.helpers import MetricDeltas, RecordingProducer

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeFetcher:
    def __init__(self) -> None:
        self.urls: list[str] = []

    async def fetch(self, url: str) -> FetchedImage:
        self.urls.append(url)
        if "bad" in url:
            raise RejectedFetchError(f"HTTP 404 for {url}")
        return FetchedImage(url, url, "image/jpeg", JPEG, 1.0, 1)


def tweet(tweet_id: str, *media: tuple[str, str | None]) -> dict:
    return {
        "id": tweet_id,
        "text": "a & b",
        "media": [
            {"media_key": f"{tweet_id}_{i}", "type": kind, "url": url}
            for i, (kind, url) in enumerate(media)
        ],
        "matching_rules": [{"id": "1", "tag": "cats"}],
        "source": "test",
        "ingested_at_ms": 1.0,
    }


def run(stage: ShedAndFetch, codec: Codec, value: bytes, offset: int = 0) -> list[tuple[str, dict]]:
    consumed = Consumed(value, SourceRef("tweets", 0, offset, b"k"))
    outgoing = asyncio.run(stage.process(consumed))
    records = {
        "images": "ImageEvent",
        "tweets.shed": "ShedRecord",
        "deadletter": "DeadLetter",
        "hashtags": "HashtagResult",
    }
    # Through the codec, as the producer would: every value must fit its schema.
    return [
        (o.topic, codec.decode(records[o.topic], codec.encode(records[o.topic], o.value)))
        for o in outgoing
    ]


def fixed(rate: float = 1e6, burst: float = 1e6) -> AdmissionController:
    """The fixed ceiling alone, as before the closed loop."""
    return AdmissionController(target_s=2.0, ceiling_rate=rate, ceiling_burst=burst, mode="fixed")


def make(
    rate: float = 100.0, burst: float = 100.0, *, admission=None, cache=None
) -> tuple[ShedAndFetch, Codec, FakeFetcher]:
    codec, fetcher = Codec(), FakeFetcher()
    stage = ShedAndFetch(
        codec=codec, fetcher=fetcher, admission=admission or fixed(rate, burst), cache=cache
    )
    return stage, codec, fetcher


def test_photos_become_image_events_and_failed_fetches_dead_letters() -> None:
    stage, codec, fetcher = make()
    value = codec.encode(
        "Tweet", tweet("1", ("photo", "http://h/a.jpg"), ("video", None), ("photo", "http://h/bad"))
    )
    out = run(stage, codec, value, offset=7)
    assert [topic for topic, _ in out] == ["images", "deadletter"]
    image, dead = out[0][1], out[1][1]
    assert image["media_key"] == "1_0" and image["image"] == JPEG and image["tweet_text"] == "a & b"
    assert image["matching_rules"] == ["cats"] and image["position"] == 0
    assert dead["stage"] == "fetch" and dead["media_key"] == "1_2" and dead["source_offset"] == 7
    assert fetcher.urls == ["http://h/a.jpg", "http://h/bad"]  # never the video


def test_no_photo_and_over_rate_are_shed_with_reasons() -> None:
    stage, codec, fetcher = make(rate=0.001, burst=1.0)
    out = run(stage, codec, codec.encode("Tweet", tweet("1", ("animated_gif", None))))
    assert out[0][0] == "tweets.shed" and out[0][1]["reason"] == "no_photo"
    assert out[0][1]["detail"] == "media: animated_gif"
    first = run(stage, codec, codec.encode("Tweet", tweet("2", ("photo", "http://h/a.jpg"))))
    second = run(stage, codec, codec.encode("Tweet", tweet("3", ("photo", "http://h/b.jpg"))))
    assert first[0][0] == "images"
    assert second[0][0] == "tweets.shed" and second[0][1]["reason"] == "over_rate"
    assert second[0][1]["media_keys"] == ["3_0"] and fetcher.urls == ["http://h/a.jpg"]


def test_the_controller_sheds_over_capacity_and_deadline_with_its_state() -> None:
    clock = Clock()
    controller = AdmissionController(target_s=2.0, ceiling_rate=1e6, ceiling_burst=1e6, clock=clock)
    controller.observe_capacity("c1", images_per_s=4.0, queue_depth=0)
    stage, codec, _ = make(admission=controller)
    fresh = [tweet(f"{n}", ("photo", f"http://h/{n}.jpg")) for n in range(10)]
    for t in fresh:
        t["ingested_at_ms"] = now_ms()
    outcomes = [run(stage, codec, codec.encode("Tweet", t)) for t in fresh]
    shed = [out[0][1] for out in outcomes if out[0][0] == "tweets.shed"]
    assert shed and {r["reason"] for r in shed} == {"over_capacity"}
    record = shed[0]
    assert record["controller_mode"] == "closed_loop" and record["capacity_images_per_s"] == 4.0
    assert record["priority"] == "high" and record["admitted_images_per_s"] > 0
    old = tweet("old", ("photo", "http://h/old.jpg"))
    old["ingested_at_ms"] = now_ms() - 5000  # its latency is already lost
    (late,) = run(stage, codec, codec.encode("Tweet", old))
    assert late[0] == "tweets.shed" and late[1]["reason"] == "deadline"


def test_repeated_photos_are_answered_from_the_cache_without_fetch_or_inference() -> None:
    cache = ResultCache(max_entries=100, ttl_s=60)
    stage, codec, fetcher = make(cache=cache)
    (first,) = run(stage, codec, codec.encode("Tweet", tweet("1", ("photo", "http://h/a.jpg"))))
    assert first[0] == "images"
    # The inference consumer's result for it comes back on `hashtags`.
    cache.add(
        {
            "media_key": "1_0", "url": "http://h/a.jpg", "hashtags": ["#cats"],
            "top_class": "cats", "scores": {"cats": 0.5}, "model_id": "m",
            "model_version": "1", "thumbnail": b"jpg",
        }
    )  # fmt: skip
    retweet = tweet("2", ("photo", "http://h/a.jpg"))
    retweet["media"][0]["media_key"] = "1_0"
    (hit,) = run(stage, codec, codec.encode("Tweet", retweet))
    assert hit[0] == "hashtags" and hit[1]["cached"] and hit[1]["tweet_id"] == "2"
    assert hit[1]["hashtags"] == ["#cats"] and hit[1]["model_version"] == "1"
    # The same bytes at another URL (the fake host serves one JPEG): fetched, not inferred.
    (copy,) = run(stage, codec, codec.encode("Tweet", tweet("3", ("photo", "http://h/c.jpg"))))
    assert copy[0] == "hashtags" and copy[1]["cached"] and copy[1]["media_key"] == "3_0"
    assert fetcher.urls == ["http://h/a.jpg", "http://h/c.jpg"]
    assert cache.hits == 2 and cache.misses == 1


def test_a_deletion_ends_as_one_retraction_and_an_edit_retracts_before_its_own_results() -> None:
    stage, codec, fetcher = make()
    gone = dict(tweet("at://did:plc:a/app.bsky.feed.post/1"), operation="delete", text="")
    gone["media"], gone["ingested_at_ms"] = [], 5.0
    (out,) = run(stage, codec, codec.encode("Tweet", gone))
    assert out[0] == "hashtags" and out[1]["retraction"] is True
    assert out[1]["tweet_id"] == gone["id"] and out[1]["timestamps"]["ingested"] == 5.0
    assert out[1]["media_key"] == "" and out[1]["hashtags"] == [] and fetcher.urls == []

    edited = dict(tweet("m1", ("photo", "http://h/new.jpg")), operation="update")
    out = run(stage, codec, codec.encode("Tweet", edited))
    assert [topic for topic, _ in out] == ["hashtags", "images"]
    assert out[0][1]["retraction"] and out[0][1]["tweet_id"] == "m1"
    assert out[1][1]["media_key"] == "m1_0" and fetcher.urls == ["http://h/new.jpg"]
    # An edit that took the photos away: the retraction, and the version is shed.
    bare = dict(tweet("m2", ("video", None)), operation="update")
    out = run(stage, codec, codec.encode("Tweet", bare))
    assert [topic for topic, _ in out] == ["hashtags", "tweets.shed"]


def test_garbage_is_a_dead_letter_with_its_bytes() -> None:
    stage, codec, _ = make()
    (out,) = run(stage, codec, b"\xc3\x01garbage", offset=3)
    assert out[0] == "deadletter"
    assert out[1]["stage"] == "decode_tweet" and out[1]["payload"] == b"\xc3\x01garbage"
    assert out[1]["error_class"] == "CodecError" and out[1]["source_offset"] == 3


@dataclass
class FakeMessage:
    topic: str
    partition: int
    offset: int


@dataclass
class FakeEvent:
    """A Faust event as `run_agent` sees it: value, key, message and ack()."""

    value: bytes
    message: FakeMessage
    acks: list = field(repr=False)
    key: bytes | None = None

    def ack(self) -> None:
        self.acks.append((self.message.partition, self.message.offset))


class GatedFetcher:
    """Fetches that finish only when a test opens their URL's gate."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []

    def gate(self, url: str) -> asyncio.Event:
        return self.gates.setdefault(url, asyncio.Event())

    async def fetch(self, url: str) -> FetchedImage:
        self.started.append(url)
        await self.gate(url).wait()
        return FetchedImage(url, url, "image/jpeg", JPEG, 1.0, 1)


def test_agent_acks_in_offset_order_while_a_slow_photo_holds_only_the_acks() -> None:
    async def main() -> None:
        codec, fetcher, producer = Codec(), GatedFetcher(), RecordingProducer()
        stage = ShedAndFetch(codec=codec, fetcher=fetcher, admission=fixed())
        acks: list[tuple[int, int]] = []
        urls = [f"http://h/{n}.jpg" for n in range(6)]
        events = [
            FakeEvent(
                codec.encode("Tweet", tweet(str(n), ("photo", urls[n]))),
                FakeMessage("tweets", n % 2, 10 + n // 2),
                acks,
            )
            for n in range(6)
        ]
        stream: asyncio.Queue = asyncio.Queue()

        async def feed():
            while (event := await stream.get()) is not None:
                yield event

        agent = asyncio.create_task(
            run_agent(feed(), stage, producer, max_in_flight=10, max_unacked=100)
        )
        for event in events:
            stream.put_nowait(event)
        for url in urls[1:]:  # every photo but the first (partition 0, offset 10) is fast
            fetcher.gate(url).set()
        await asyncio.sleep(0.05)
        # All six fetches started (the slow one holds no work back); the five fast
        # tweets are delivered, but partition 0 acks nothing past its slow offset 10.
        assert len(fetcher.started) == 6 and len(producer.of("images")) == 5
        assert acks == [(1, 10), (1, 11), (1, 12)]
        fetcher.gate(urls[0]).set()
        await asyncio.sleep(0.05)
        assert sorted(acks[3:]) == [(0, 10), (0, 11), (0, 12)] and acks[3] == (0, 10)
        stream.put_nowait(None)
        await asyncio.wait_for(agent, 1)

    asyncio.run(main())


def test_agent_stops_consuming_when_the_unacked_window_is_full() -> None:
    async def main() -> None:
        codec, fetcher, producer = Codec(), GatedFetcher(), RecordingProducer()
        stage = ShedAndFetch(codec=codec, fetcher=fetcher, admission=fixed())
        acks: list[tuple[int, int]] = []
        consumed: list[int] = []

        async def feed():
            for n in range(10):
                consumed.append(n)
                value = codec.encode("Tweet", tweet(str(n), ("photo", f"http://h/{n}")))
                yield FakeEvent(value, FakeMessage("tweets", 0, n), acks)

        for n in range(1, 10):
            fetcher.gate(f"http://h/{n}").set()
        agent = asyncio.create_task(
            run_agent(feed(), stage, producer, max_in_flight=10, max_unacked=4)
        )
        await asyncio.sleep(0.05)
        # Offset 0 is slow: 1..3 finish, but the window of 4 unacked tweets is full.
        assert consumed == [0, 1, 2, 3, 4] and acks == []
        fetcher.gate("http://h/0").set()
        await asyncio.wait_for(agent, 1)
        assert acks == [(0, n) for n in range(10)]

    asyncio.run(main())


def test_the_agent_counts_each_outcome_once_its_records_are_delivered() -> None:
    async def main() -> dict[tuple[str, int], int]:
        cache = ResultCache(max_entries=100, ttl_s=60)
        stage, codec, _ = make(cache=cache)
        cache.add(
            {
                "media_key": "known", "url": "http://h/known.jpg", "hashtags": ["#cats"],
                "top_class": "cats", "scores": {"cats": 0.5}, "model_id": "m",
                "model_version": "1", "thumbnail": b"jpg",
            }
        )  # fmt: skip
        repeat = tweet("4", ("photo", "http://h/known.jpg"))
        repeat["ingested_at_ms"] = now_ms() - 250.0
        gone = dict(tweet("5"), operation="delete", text="")
        values = [
            codec.encode("Tweet", tweet("1", ("photo", "http://h/a.jpg"))),
            codec.encode("Tweet", tweet("2", ("video", None))),
            codec.encode("Tweet", tweet("3", ("photo", "http://h/bad.jpg"))),
            codec.encode("Tweet", repeat),
            codec.encode("Tweet", gone),
            b"\xc3\x01garbage",
        ]
        acks: list = []

        async def feed():
            for offset, value in enumerate(values):
                yield FakeEvent(value, FakeMessage("tweets", 1, 100 + offset), acks)

        offsets: dict[tuple[str, int], int] = {}
        producer = RecordingProducer()
        await run_agent(
            feed(), stage, producer, max_in_flight=10, max_unacked=100, read_offsets=offsets
        )
        assert len(acks) == len(values) and len(producer.sent) == 6
        return offsets

    moved = MetricDeltas()
    in_flight = moved.now("tagstream_agent_tweets_in_flight")
    offsets = asyncio.run(main())
    assert offsets == {("tweets", 1): 105}  # the last offset read, for the lag
    assert moved.delta("tagstream_agent_tweets_consumed_total") == 6
    assert moved.delta("tagstream_agent_tweets_admitted_total") == 3  # 1, 3 and the repeat
    assert moved.delta("tagstream_agent_tweets_shed_total", reason="no_photo") == 1
    assert moved.delta("tagstream_agent_images_total") == 1
    assert moved.delta("tagstream_agent_cached_results_total") == 1
    assert moved.delta("tagstream_agent_retractions_total") == 1
    fetch_failed = {"stage": "fetch", "cause": "RejectedFetchError"}
    assert moved.delta("tagstream_dead_letters_total", **fetch_failed) == 1
    undecodable = {"stage": "decode_tweet", "cause": "CodecError"}
    assert moved.delta("tagstream_dead_letters_total", **undecodable) == 1
    assert moved.delta("tagstream_agent_result_cache_lookups_total", outcome="hit") == 1
    # The cached answer is a result: its latency from ingestion is observed, by source.
    assert moved.delta("tagstream_end_to_end_seconds_count", source="test") == 1
    assert moved.delta("tagstream_end_to_end_seconds_sum", source="test") >= 0.25
    assert moved.now("tagstream_agent_tweets_in_flight") == in_flight


class RefusingProducer(RecordingProducer):
    """Refuses what `refuse` says, as the broker or the codec would."""

    def __init__(self, refuse) -> None:
        super().__init__()
        self.refuse = refuse
        self.tries = 0

    async def deliver(self, outgoing) -> None:
        self.tries += 1
        error = self.refuse(outgoing)
        if error is not None:
            raise error
        await super().deliver(outgoing)


def test_output_the_broker_refuses_for_good_becomes_one_dead_letter() -> None:
    from infra.record_producer import DeliveryError
    from processors.shed_and_fetch import deliver

    consumed = Consumed(b"tweet bytes", SourceRef("tweets", 0, 9, b"k"))
    too_large = DeliveryError("Message size too large", permanent=True)
    producer = RefusingProducer(lambda out: too_large if out[0].topic == "images" else None)
    image = Outgoing("images", "3_1", {"media_key": "3_1"})
    delivered = asyncio.run(deliver(producer, [image], consumed))
    (letter,) = producer.of("deadletter")
    assert [o.topic for o in delivered] == ["deadletter"] and producer.tries == 2
    assert letter["stage"] == "deliver" and letter["payload"] is None
    assert letter["source_offset"] == 9 and "too large" in letter["message"]


def test_output_that_cannot_be_delivered_at_all_is_retried_with_waits_not_spun() -> None:
    from processors.shed_and_fetch import deliver

    consumed = Consumed(b"tweet bytes", SourceRef("tweets", 0, 9, b"k"))
    producer = RefusingProducer(lambda out: CodecError("does not fit its schema"))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 4:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(deliver(producer, [Outgoing("images", "3_1", {})], consumed, sleep=sleep))
    # Replaced by a dead letter once, then every try waits, longer each time.
    assert producer.tries == 5 and waits == [0.5, 1.0, 2.0, 4.0]


def test_health_is_well_until_the_agent_stops_and_says_why_it_did() -> None:
    """The worker's /healthz: well before the first start (a group's first join is slow)
    and while the agent runs; 503 with the error once the agent's stream has failed; well
    again when Faust's supervisor starts the agent anew."""
    health = AgentHealth()
    assert health.report() == (200, {"status": "starting"})
    stage = ShedAndFetch(codec=Codec(), fetcher=GatedFetcher(), admission=fixed())

    async def run(events) -> None:
        with health.run():
            await run_agent(events, stage, RecordingProducer(), max_in_flight=2, max_unacked=2)

    async def failing_stream():
        assert health.report() == (200, {"status": "ok", "agent_starts": 1})
        raise ConnectionError("the consumer's stream broke")
        yield  # makes this an async generator

    with pytest.raises(ConnectionError):
        asyncio.run(run(failing_stream()))
    status, body = health.report()
    assert status == 503
    assert body == {"status": "failed", "error": "ConnectionError: the consumer's stream broke"}

    async def empty_stream():
        assert health.report() == (200, {"status": "ok", "agent_starts": 2})
        return
        yield

    asyncio.run(run(empty_stream()))
    assert health.report() == (503, {"status": "stopped"})


class RegistryAwayCodec(Codec):
    """The codec of a process whose schema registry does not answer `away` times."""

    def __init__(self, away: int) -> None:
        super().__init__()
        self.away = away

    def decode(self, record: str, data: bytes):  # type: ignore[override]
        if self.away:
            self.away -= 1
            raise RegistryUnavailableError("schema registry http://r:8081 failed: ConnectError")
        return super().decode(record, data)


def test_a_registry_that_does_not_answer_is_waited_for_never_a_dead_letter() -> None:
    """A tweet the registry cannot yet resolve waits (its ack with it) and then goes on as
    any tweet; output whose encoding finds the registry away is retried as it is."""
    from processors.shed_and_fetch import deliver, process

    codec = RegistryAwayCodec(away=3)
    stage = ShedAndFetch(codec=codec, fetcher=FakeFetcher(), admission=fixed())
    consumed = Consumed(codec.encode("Tweet", tweet("4", ("photo", "http://h/a.jpg"))),
                        SourceRef("tweets", 0, 4, b"4"))  # fmt: skip
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    out = asyncio.run(process(stage, consumed, sleep=sleep))
    assert [o.topic for o in out] == ["images"] and waits == [0.5, 1.0, 2.0]

    away = RegistryUnavailableError("cannot encode ImageEvent: schema registry answered 503")
    producer = RefusingProducer(lambda out: away if producer.tries <= 2 else None)
    delivered = asyncio.run(deliver(producer, out, consumed, sleep=sleep))
    assert delivered == out and producer.tries == 3 and waits[3:] == [0.5, 1.0]
    assert [topic for topic, _, _ in producer.sent] == ["images"]
