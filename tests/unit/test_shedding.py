"""The shedding/fetch stage's decisions, with a fake fetcher (no Kafka, no Faust)."""

from __future__ import annotations

import asyncio

from infra.exceptions import RejectedFetchError
from infra.fetcher import FetchedImage
from infra.settings import Settings
from processors.admission import AdmissionController
from processors.shed_and_fetch import ShedAndFetch, SourceRecord
from schemas.codec import Codec

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64


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
    source = SourceRecord(value, b"k", "tweets", 0, offset)
    outgoing = asyncio.run(stage.process(source))
    records = {"images": "ImageEvent", "tweets.shed": "ShedRecord", "deadletter": "DeadLetter"}
    return [(o.topic, codec.decode(records[o.topic], o.value)) for o in outgoing]


def make(rate: float = 100.0, burst: float = 100.0) -> tuple[ShedAndFetch, Codec, FakeFetcher]:
    codec, fetcher = Codec(), FakeFetcher()
    stage = ShedAndFetch(
        settings=Settings(),
        codec=codec,
        fetcher=fetcher,
        admission=AdmissionController(rate=rate, burst=burst),
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


def test_garbage_is_a_dead_letter_with_its_bytes() -> None:
    stage, codec, _ = make()
    (out,) = run(stage, codec, b"\xc3\x01garbage", offset=3)
    assert out[0] == "deadletter"
    assert out[1]["stage"] == "decode_tweet" and out[1]["payload"] == b"\xc3\x01garbage"
    assert out[1]["error_class"] == "CodecError" and out[1]["source_offset"] == 3
