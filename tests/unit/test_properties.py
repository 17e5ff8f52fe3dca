"""Property-based tests (hypothesis) for everything that comes from outside.

Stream lines, archive lines, Avro bodies, image bytes and URLs are untrusted. For any
of them, a process must raise nothing but our own errors, and every input must end
accounted for: a tweet, a shed record, image events, or a dead letter.
"""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from infra.demo_images import render_demo_jpeg
from infra.exceptions import CodecError, DecodeImageError, RejectedFetchError, TagstreamError
from infra.fetcher import FetchedImage, ImageFetcher, _blocked_reason, _ip_literal
from infra.record_producer import SourceRef
from infra.settings import Settings
from models.presets import ServingPreset
from processors.admission import AdmissionController
from processors.shed_and_fetch import Consumed, ShedAndFetch
from producers.replay import ReplaySource
from producers.source import MAX_PAUSE_S, pump
from producers.tweets import tweet_from_stream_line
from producers.xapi import FilteredStream, XStreamSource, _Reconnect
from schemas.codec import RECORD_NAMES, Codec
from schemas.records import photos
from tests.helpers import RecordingProducer

CODEC = Codec()
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON of any shape, and values shaped like (and often almost) X API v2 stream lines.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
media_items = st.fixed_dictionaries(
    {},
    optional={
        "media_key": st.text(max_size=6) | json_values,
        "type": st.sampled_from(["photo", "video", "animated_gif", ""]) | json_values,
        "url": st.just("http://img.example/a.jpg") | json_values,
        "width": st.integers(-5, 5000) | json_values,
        "alt_text": json_values,
    },
)
stream_lines = st.fixed_dictionaries(
    {},
    optional={
        "data": st.fixed_dictionaries(
            {},
            optional={
                "id": st.text(min_size=1, max_size=8) | json_values,
                "text": st.text(max_size=40) | json_values,
                "author_id": json_values,
                "attachments": st.fixed_dictionaries(
                    {}, optional={"media_keys": st.lists(st.text(max_size=6)) | json_values}
                )
                | json_values,
            },
        )
        | json_values,
        "includes": st.fixed_dictionaries({}, optional={"media": st.lists(media_items, max_size=4)})
        | json_values,
        "matching_rules": st.lists(
            st.fixed_dictionaries(
                {}, optional={"id": st.text(max_size=4) | st.integers(), "tag": json_values}
            ),
            max_size=3,
        )
        | json_values,
        "errors": json_values,
    },
)


def accounted(item: Any) -> str:
    """What a source item became: a tweet that encodes, or a rejection with bytes."""
    if item.tweet is not None:
        CODEC.encode("Tweet", item.tweet)  # must fit the schema
        return "tweet"
    assert item.rejected is not None and isinstance(item.rejected.raw, bytes)
    return "rejected"


# Stream lines ---------------------------------------------------------------------------


@PROPERTY
@given(stream_lines)
def test_any_stream_line_is_a_tweet_that_encodes_or_a_codec_error(line: dict) -> None:
    try:
        tweet = tweet_from_stream_line(line, source="test", ingested_at_ms=1.0)
    except CodecError:
        return
    CODEC.decode("Tweet", CODEC.encode("Tweet", tweet))
    assert all(p["url"] for p in photos(tweet))


class FakeLines:
    """A FilteredStream's parsing over given raw lines, without the network."""

    def __init__(self, raw: list[bytes]) -> None:
        self.raw = raw
        self.parser = FilteredStream.__new__(FilteredStream)
        self.parser.counters = __import__("collections").Counter()
        self.parser._failures = __import__("collections").Counter()
        self.reconnects = 0

    async def stream_lines(self):
        for raw in self.raw:
            try:
                yield self.parser._parse(raw)
            except _Reconnect:  # an error object: the stream reconnects, the line is done
                self.reconnects += 1


@PROPERTY
@given(
    st.lists(
        stream_lines.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=60), max_size=8
    )
)
@example([b"{not json", b"[1, 2]", b'{"errors": [{"title": "operational-disconnect"}]}'])
def test_any_bytes_from_the_x_stream_become_tweets_or_dead_letters(raw: list[bytes]) -> None:
    fake = FakeLines(raw)
    producer = RecordingProducer()
    counts = asyncio.run(pump(XStreamSource(fake), producer))  # type: ignore[arg-type]
    # Every line: a tweet, a repeat of one, a dead letter, or an error object.
    total = counts["tweets"] + counts["duplicates"] + counts["dead_letters"] + fake.reconnects
    assert total == len(raw)
    assert len(producer.of("deadletter")) == counts["dead_letters"]
    for letter in producer.of("deadletter"):
        assert letter["stage"] == "x_stream" and letter["payload"] is not None


# Archive lines ----------------------------------------------------------------------------


archive_lines = (
    st.builds(lambda t, line: json.dumps({"t": t, "line": line}), json_values, stream_lines)
    | st.builds(lambda t, raw: json.dumps({"t": t, "raw": raw}), json_values, json_values)
    | stream_lines.map(json.dumps)
    | st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s)
)


@PROPERTY
@given(st.lists(archive_lines, min_size=1, max_size=6))
@example(['{"t": Infinity, "line": {"data": {"id": "1", "text": "x"}}}', '{"t": 1e308}'])
@example(['{"t": NaN, "line": {"data": {"id": "1", "text": "x"}}}'])
@example(["\x1f"])  # blank to str.strip(), not to the reader: a dead letter
@example(['{"t": 0, "line": {}}', '{"t": 3600000318.0, "line": {}}'])  # a 41-day gap
@example(['{"t": 1, "line": {}}', '{"t": Infinity, "line": {"data": {"id": "2", "text": "y"}}}'])
@example(['{"t": 1, "line": {}}', '{"t": 1' + "0" * 400 + ', "raw": "x"}'])
def test_any_archive_line_replays_as_a_tweet_or_a_dead_letter(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "archive.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
        source = ReplaySource(Settings(), archive=path, speed="1000x", run_id="r")
        producer = RecordingProducer()
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        counts = asyncio.run(pump(source, producer, sleep=sleep))
    # Blank as the reader sees it: ASCII whitespace only (str.strip() would drop more).
    blank = sum(1 for line in lines if not line.encode("utf-8", "surrogateescape").strip())
    assert counts["tweets"] + counts["dead_letters"] == len(lines) - blank
    # A hostile receive time (infinite, huge, a gap of years) never makes the replay wait
    # for ever: no pause is longer than MAX_PAUSE_S.
    assert all(0 <= s <= MAX_PAUSE_S for s in sleeps), sleeps


# Avro bodies --------------------------------------------------------------------------------


def mutated(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    body = bytearray(data)
    for position, value in flips:
        if body:
            body[position % len(body)] = value
    return bytes(body[: max(0, len(body) - cut)])


VALID_TWEET = CODEC.encode(
    "Tweet",
    tweet_from_stream_line(
        {
            "data": {"id": "1", "text": "x", "attachments": {"media_keys": ["3_1"]}},
            "includes": {"media": [{"media_key": "3_1", "type": "photo", "url": "http://h/a"}]},
        },
        source="t",
        ingested_at_ms=1.0,
    ),
)


@PROPERTY
@given(
    st.sampled_from(RECORD_NAMES),
    st.binary(max_size=80)
    | st.builds(
        mutated,
        st.just(VALID_TWEET),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        st.integers(0, 20),
    ),
)
def test_any_avro_body_decodes_or_raises_codec_error(record: str, data: bytes) -> None:
    try:
        value = CODEC.decode(record, data)
    except CodecError:
        return
    CODEC.encode(record, value)  # what decodes is a valid record


class InstantFetcher:
    async def fetch(self, url: str) -> FetchedImage:
        if "bad" in url:
            raise RejectedFetchError(f"{url}: refused")
        return FetchedImage(url, url, "image/jpeg", b"\xff\xd8\xff", 1.0, 1)


@PROPERTY
@given(
    st.binary(max_size=80)
    | st.builds(
        mutated,
        st.just(VALID_TWEET),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        st.integers(0, 20),
    )
    | stream_lines.map(lambda line: _encoded_or_garbage(line))
)
def test_any_record_on_tweets_ends_as_images_shed_or_dead_letters(value: bytes) -> None:
    stage = ShedAndFetch(
        codec=CODEC,
        fetcher=InstantFetcher(),
        admission=AdmissionController(target_s=2, ceiling_rate=1, ceiling_burst=1),
    )
    outgoing = asyncio.run(stage.process(Consumed(value, SourceRef("tweets", 0, 5, b"k"))))
    assert outgoing, "nothing came of a consumed record"
    topics = {o.topic for o in outgoing}
    assert topics <= {"images", "tweets.shed", "deadletter"}
    assert not ("tweets.shed" in topics and len(outgoing) > 1)
    producer = RecordingProducer()
    asyncio.run(producer.deliver(outgoing))  # every outgoing value fits its schema


def _encoded_or_garbage(line: dict) -> bytes:
    try:
        tweet = tweet_from_stream_line(line, source="t", ingested_at_ms=1.0)
    except CodecError:
        return json.dumps(line).encode()
    return CODEC.encode("Tweet", tweet)


# Image bytes -------------------------------------------------------------------------------


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (37, 23), (200, 10, 90)).save(buf, format=fmt)
    return buf.getvalue()


VALID_IMAGES = [render_demo_jpeg("cats", 1, size=96), _image_bytes("PNG"), _image_bytes("GIF")]


@PROPERTY
@given(
    st.binary(max_size=200)
    | st.builds(
        mutated,
        st.sampled_from(VALID_IMAGES),
        st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=6),
        st.integers(0, 400),
    )
)
def test_any_image_bytes_decode_to_model_input_or_raise_decode_image_error(data: bytes) -> None:
    preset = ServingPreset(input_size=32, resize_size=40)
    try:
        array, _ = preset.from_bytes(data)
    except DecodeImageError:
        return
    assert array.shape == (3, 32, 32)


@pytest.mark.parametrize("size", [(1, 60_000), (60_000, 1), (3, 20_000)])
def test_extreme_aspect_ratios_give_small_model_inputs(size: tuple[int, int]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, format="PNG")
    array, resized = ServingPreset(input_size=32).from_bytes(buf.getvalue())
    assert array.shape == (3, 32, 32) and resized.size == (32, 32)


# URLs ----------------------------------------------------------------------------------------

hosts = st.sampled_from(
    ["127.0.0.1", "10.0.0.1", "[::1]", "169.254.169.254", "0.0.0.0", "[::ffff:127.0.0.1]",
     "93.184.216.34", "example.com", "", "a b", "%00", "xn--", "[zz::1]"]
)  # fmt: skip
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
    st.sampled_from(["http", "https", "ftp", "file", "javascript", "HTTP", ""]),
    hosts | st.text(max_size=15),
    st.sampled_from(["", ":80", ":0", ":99999", ":-1", ":x"]),
    st.text(max_size=15),
)


@PROPERTY
@given(urls | st.text(max_size=60))
def test_any_url_is_refused_or_safe_to_dial(url: str) -> None:
    fetcher = ImageFetcher(
        concurrency=1, per_host=1, connect_timeout_s=1, read_timeout_s=1, max_bytes=1024,
        retries=0,
    )  # fmt: skip
    try:
        target = fetcher._check_url(url, url)
    except RejectedFetchError:
        return
    assert target.scheme.lower() in ("http", "https") and target.host
    ip = _ip_literal(target.host)
    assert ip is None or _blocked_reason(ip) is None  # never a private IP literal


@PROPERTY
@given(urls | st.text(max_size=60))
def test_fetching_any_url_raises_only_fetch_errors(url: str) -> None:
    async def main() -> None:
        # No name resolves on this machine's test network quickly enough to matter:
        # what must hold is that whatever happens is one of our errors, never a crash.
        async with ImageFetcher(
            concurrency=2, per_host=1, connect_timeout_s=0.2, read_timeout_s=0.2,
            max_bytes=1024, retries=0,
        ) as fetcher:  # fmt: skip
            try:
                await fetcher.fetch(url)
            except TagstreamError:
                pass

    assume("example.com" not in url)  # a real public name would leave the machine
    asyncio.run(main())


# Open networks' posts ------------------------------------------------------------------


def _bluesky_events():
    post = st.fixed_dictionaries(
        {},
        optional={
            "$type": st.just("app.bsky.feed.post") | json_values,
            "text": st.text(max_size=20) | json_values,
            "createdAt": json_values,
            "langs": json_values,
            "facets": json_values
            | st.lists(st.fixed_dictionaries({}, optional={"features": json_values})),
            "tags": json_values,
            "embed": json_values
            | st.fixed_dictionaries(
                {
                    "$type": st.sampled_from(
                        ["app.bsky.embed.images", "app.bsky.embed.recordWithMedia"]
                    )
                },
                optional={"images": json_values, "media": json_values},
            ),
        },
    )
    commit = st.fixed_dictionaries(
        {},
        optional={
            "operation": st.sampled_from(["create", "update", "delete"]) | json_values,
            "collection": st.just("app.bsky.feed.post") | json_values,
            "rkey": st.text(max_size=8) | json_values,
            "rev": json_values,
            "record": post | json_values,
        },
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "did": st.just("did:plc:abc") | json_values,
            "time_us": st.integers(0, 2**60) | json_values,
            "kind": st.just("commit") | json_values,
            "commit": commit | json_values,
        },
    )


def _mutated_post(path: int, value: object) -> dict:
    """A real-shaped Jetstream post with photos and hashtags, one field at `path` replaced
    by any JSON value: the deep fields get hostile values too."""
    from tests.unit.test_bluesky import images, post

    event = post(1_725_000_000_000_000, "3k01", "a #cat", embed=images("bafa", "bafb"),
                 hashtags=("cat",))  # fmt: skip
    record = event["commit"]["record"]
    places = [
        (event, "did"), (event, "time_us"), (event, "commit"), (event["commit"], "rkey"),
        (event["commit"], "operation"), (event["commit"], "rev"), (event["commit"], "record"),
        (record, "text"), (record, "facets"), (record, "langs"), (record, "tags"),
        (record, "embed"), (record, "createdAt"), (record["embed"], "images"),
        (record["embed"]["images"][0], "image"), (record["embed"]["images"][0], "alt"),
        (record["facets"][0], "features"), (record["facets"][0]["features"][0], "tag"),
    ]  # fmt: skip
    holder, key = places[path % len(places)]
    holder[key] = value
    return event


@PROPERTY
@given(_bluesky_events() | st.builds(_mutated_post, st.integers(0, 100), json_values))
@example(_mutated_post(8, 5))  # facets an integer: once a TypeError out of the source
def test_any_jetstream_event_is_a_tweet_that_encodes_or_a_codec_error(event: dict) -> None:
    from producers.bluesky import tweet_from_event

    try:
        tweet = tweet_from_event(
            event, cdn_url="https://cdn.example", source="bluesky", ingested_at_ms=1.0
        )
    except CodecError:
        return
    CODEC.encode("Tweet", tweet)


def _mutated_status(path: int, value: object) -> dict:
    """A real-shaped status with two images and a hashtag, one field replaced."""
    from tests.unit.test_mastodon import status

    data = status("111", tags=("cat",), images=2)
    first = data["media_attachments"][0]
    places = [(data, k) for k in data] + [(data["account"], "id"), (data["account"], "acct")]
    places += [(first, k) for k in first] + [(first["meta"], "original")]
    holder, key = places[path % len(places)]
    holder[key] = value
    return data


@PROPERTY
@given(
    st.builds(_mutated_status, st.integers(0, 200), json_values)
    | st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(min_size=1, max_size=8) | json_values,
            "uri": json_values,
            "url": json_values,
            "content": st.text(max_size=30) | json_values,
            "created_at": json_values,
            "edited_at": json_values,
            "language": json_values,
            "account": st.fixed_dictionaries({}, optional={"id": json_values, "acct": json_values})
            | json_values,
            "tags": json_values,
            "media_attachments": json_values
            | st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "id": json_values,
                        "type": st.just("image") | json_values,
                        "url": json_values,
                        "description": json_values,
                        "meta": json_values,
                    },
                ),  # fmt: skip
                max_size=4,
            ),
        },
    )
    | json_values
)
def test_any_mastodon_status_is_a_tweet_that_encodes_or_a_codec_error(status) -> None:
    from producers.mastodon import tweet_from_status

    try:
        tweet = tweet_from_status(
            status, host="m.example", operation="create", source="mastodon", ingested_at_ms=1.0
        )
    except CodecError:
        return
    CODEC.encode("Tweet", tweet)
