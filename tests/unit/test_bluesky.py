"""The Bluesky source against a fake Jetstream that speaks its wire format over a real
WebSocket (no broker): events to Tweet records, the tag filter and the post gate, the
reconnecting client (cursor, replays dropped, back-off, malformed frames), resume
after a restart, and the Faust agent's stage taking such a post as it is (photos fetched
from a CDN-shaped server, a deletion retracted)."""

from __future__ import annotations

import asyncio
import http
import json
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from websockets.asyncio.server import serve

from infra.demo_images import render_demo_jpeg
from infra.exceptions import CodecError
from infra.fetcher import ImageFetcher
from infra.record_producer import SourceRef
from infra.settings import Settings
from processors.admission import AdmissionController
from processors.shed_and_fetch import Consumed, ShedAndFetch
from producers.bluesky import (
    POST,
    BlueskyError,
    BlueskySource,
    Jetstream,
    at_uri,
    tweet_from_archived,
    tweet_from_event,
)
from producers.posts import PostGate, TagFilter, untrusted
from producers.source import PositionFile, pump
from schemas.codec import Codec
from tests.helpers import MetricDeltas, RecordingProducer, Sleeps, serve_locally

CDN = "https://cdn.example"
T0 = 1_725_911_162_000_000
ALICE = "did:plc:alice4ph3dd6ejfqqfhzsdpwy"
BOB = "did:plc:bob2bzezcjcoqgzqh7mn3xhe"


def blob(cid: str) -> dict[str, Any]:
    return {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/jpeg", "size": 91234}


def images(*cids: str) -> dict[str, Any]:
    return {
        "$type": "app.bsky.embed.images",
        "images": [
            {"alt": f"photo {cid}", "image": blob(cid), "aspectRatio": {"width": 4, "height": 3}}
            for cid in cids
        ],
    }


def commit(
    t: int,
    did: str,
    rkey: str,
    *,
    operation: str = "create",
    collection: str = POST,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "rev": f"3l3qo{t % 100000:05d}",
        "operation": operation,
        "collection": collection,
        "rkey": rkey,
    }
    if operation != "delete":
        body["record"] = record or {}
        body["cid"] = f"bafyrei{rkey}"
    return {"did": did, "time_us": t, "kind": "commit", "commit": body}


def post(
    t: int,
    rkey: str,
    text: str,
    *,
    did: str = ALICE,
    embed: dict[str, Any] | None = None,
    hashtags: tuple[str, ...] = (),
    operation: str = "create",
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "$type": POST,
        "text": text,
        "createdAt": "2024-09-09T19:46:02.102Z",
        "langs": ["en"],
    }
    if embed is not None:
        record["embed"] = embed
    if hashtags:
        record["facets"] = [
            {
                "index": {"byteStart": 0, "byteEnd": len(tag) + 1},
                "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": tag}],
            }
            for tag in hashtags
        ]
    return commit(t, did, rkey, operation=operation, record=record)


def quote_with_media(*cids: str) -> dict[str, Any]:
    return {
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {
            "$type": "app.bsky.embed.record",
            "record": {"uri": at_uri(BOB, "3kquoted"), "cid": "bafyreiquoted"},
        },
        "media": images(*cids),
    }


VIDEO = {"$type": "app.bsky.embed.video", "video": blob("bafkreivideo"), "alt": "a clip"}


def feed() -> list[dict[str, Any]]:
    """Events in time order, as Jetstream sends them; two pairs share a microsecond."""
    t = T0
    events: list[dict[str, Any]] = []

    def at(dt: int) -> int:
        nonlocal t
        t += dt
        return t

    events += [
        post(at(1000), "3k01", "my cat", embed=images("bafkreia1"), hashtags=("cats",)),
        {"did": BOB, "time_us": at(1000), "kind": "identity", "identity": {"did": BOB}},
        commit(at(1000), BOB, "3klike", collection="app.bsky.feed.like", record={"x": 1}),
        post(at(1000), "3k02", "no picture today"),
        post(at(1000), "3k03", "a DOG on the beach", embed=images("bafkreia3", "bafkreib3")),
        post(at(0), "3k04", "sunset", embed=images("bafkreia4")),  # same time_us: no match
        post(at(1000), "3k05", "look", did=BOB, embed=quote_with_media("bafkreia5")),
        post(at(1000), "3k06", "cat video", embed=VIDEO, hashtags=("cats",)),
        commit(at(1000), ALICE, "3k01", operation="delete"),  # of a post we produced
        commit(at(0), BOB, "3kzz", operation="delete"),  # of one we never saw
        {"did": BOB, "time_us": at(1000), "kind": "account", "account": {"active": False}},
        post(at(1000), "3k03", "a DOG, edited", embed=images("bafkreia3"), operation="update"),
        post(at(1000), "3k07", "cows", embed=images("bafkreia7"), hashtags=("cow",)),
        post(at(1000), "3k08", "horse", embed=images("bafkreia8"), hashtags=("Horse",)),
    ]
    events[6]["commit"]["record"]["text"] = "look #cats"  # a word, not a facet
    return events


class FakeJetstream:
    """Jetstream over a real WebSocket on loopback: JSON text frames, the subscribe
    query (``wantedCollections``, ``cursor`` inclusive, in microseconds), and one script
    per connection: ``("send", n)`` the next n events from the cursor, ``("raw", frame)``,
    ``("drop",)`` (no close frame), ``("close",)``, ``("stall",)``, ``("http", status)``
    (the handshake is refused). After the scripts, connections stall."""

    def __init__(self, events: list[dict[str, Any]], scripts: list[list[tuple]]) -> None:
        self.events = events
        self.scripts = scripts
        self.queries: list[dict[str, list[str]]] = []
        self.sent: list[int] = []  # time_us of every event sent
        self._server: Any = None
        self._refusals: dict[int, int] = {}

    async def start(self) -> str:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._check)
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/subscribe"

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _script(self) -> list[tuple]:
        n = len(self.queries) - 1
        return self.scripts[n] if n < len(self.scripts) else [("stall",)]

    def _check(self, connection: Any, request: Any) -> Any:
        self.queries.append(parse_qs(urlsplit(request.path).query))
        script = self._script()
        if script and script[0][0] == "http":
            return connection.respond(http.HTTPStatus(script[0][1]), "busy\n")
        return None

    async def _handle(self, ws: Any) -> None:
        query = self.queries[-1]
        assert query["wantedCollections"] == [POST]
        cursor = int(query["cursor"][0]) if "cursor" in query else None
        index = 0 if cursor is None else next(
            (i for i, e in enumerate(self.events) if e["time_us"] >= cursor), len(self.events)
        )  # fmt: skip
        for action in self._script():
            if action[0] == "send":
                for event in self.events[index : index + action[1]]:
                    await ws.send(json.dumps(event))
                    self.sent.append(event["time_us"])
                index += action[1]
            elif action[0] == "raw":
                await ws.send(action[1])
            elif action[0] == "drop":
                await asyncio.sleep(0.05)  # let the frames before it leave
                ws.transport.abort()
                return
            elif action[0] == "close":
                await ws.close()
                return
            elif action[0] == "stall":
                await ws.wait_closed()
        await ws.wait_closed()


# Events to records ---------------------------------------------------------------------


def convert(event: dict[str, Any]) -> Any:
    return tweet_from_event(event, cdn_url=CDN, source="bluesky", ingested_at_ms=1.0)


def test_a_post_with_images_becomes_a_tweet_with_cdn_urls() -> None:
    event = post(T0, "3k01", "my cat #cats", embed=images("bafkreia1", "bafkreib1", "bafkreia1"))
    event["commit"]["record"]["tags"] = ["kitten"]
    event["commit"]["record"]["facets"] = [
        {
            "index": {"byteStart": 7, "byteEnd": 12},
            "features": [
                {"$type": "app.bsky.richtext.facet#tag", "tag": "cats"},
                {"$type": "app.bsky.richtext.facet#link", "uri": "https://x"},
            ],
        }
    ]
    tweet = convert(event)
    uri = f"at://{ALICE}/app.bsky.feed.post/3k01"
    assert tweet["id"] == tweet["post_id"] == uri
    assert tweet["network"] == "bluesky" and tweet["author_id"] == ALICE
    assert tweet["post_url"] == f"https://bsky.app/profile/{ALICE}/post/3k01"
    assert tweet["text"] == "my cat #cats" and tweet["langs"] == ["en"]
    assert tweet["tags"] == ["cats", "kitten"] and tweet["operation"] == "create"
    assert tweet["revision"] == event["commit"]["rev"]
    assert tweet["created_at"] == "2024-09-09T19:46:02.102Z"
    first, second = tweet["media"]  # the repeated blob once
    assert first["media_key"] == f"{uri}#bafkreia1" and first["type"] == "photo"
    assert first["url"] == f"{CDN}/img/feed_fullsize/plain/{ALICE}/bafkreia1@jpeg"
    assert first["preview_image_url"] == f"{CDN}/img/feed_thumbnail/plain/{ALICE}/bafkreia1@jpeg"
    assert (first["width"], first["height"], first["alt_text"]) == (4, 3, "photo bafkreia1")
    assert second["media_key"].endswith("#bafkreib1")


def test_quotes_with_media_videos_links_legacy_blobs_deletes_and_edits() -> None:
    quoted = convert(post(T0, "3k05", "look", did=BOB, embed=quote_with_media("bafkreia5")))
    assert [m["url"] for m in quoted["media"]] == [
        f"{CDN}/img/feed_fullsize/plain/{BOB}/bafkreia5@jpeg"
    ]
    video = convert(post(T0, "3k06", "clip", embed=VIDEO))
    assert [(m["type"], m["url"]) for m in video["media"]] == [("video", None)]
    link = {"$type": "app.bsky.embed.external", "external": {"uri": "https://a", "thumb": {}}}
    assert convert(post(T0, "3k09", "read this", embed=link))["media"] == []
    legacy = images("unused")
    legacy["images"][0]["image"] = {"cid": "bafkreiold", "mimeType": "image/png"}
    assert convert(post(T0, "3k10", "old", embed=legacy))["media"][0]["url"].endswith(
        "/bafkreiold@jpeg"
    )
    gone = convert(commit(T0, ALICE, "3k01", operation="delete"))
    assert gone["operation"] == "delete" and gone["id"] == at_uri(ALICE, "3k01")
    assert gone["text"] == "" and gone["media"] == [] and gone["author_id"] == ALICE
    edited = convert(post(T0, "3k01", "fixed typo", embed=images("bafkreia1"), operation="update"))
    assert edited["operation"] == "update" and edited["id"] == at_uri(ALICE, "3k01")


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda e: e.pop("did"), "'did'"),
        (lambda e: e["commit"].pop("rkey"), "'rkey'"),
        (lambda e: e["commit"].update(operation="merge"), "unknown operation"),
        (lambda e: e["commit"].update(record="text"), "'record'"),
        (lambda e: e["commit"]["record"].update(text=42), "'text'"),
        (lambda e: e["commit"]["record"]["embed"].update(images={}), "must be a list"),
        (lambda e: e["commit"]["record"]["embed"]["images"][0].pop("image"), "blob"),
        (lambda e: e["commit"]["record"]["embed"]["images"][0]["image"].pop("ref"), "cid"),
    ],
)
def test_malformed_posts_raise_codec_errors(mangle: Any, message: str) -> None:
    event = post(T0, "3k01", "cat", embed=images("bafkreia1"))
    mangle(event)
    with pytest.raises(CodecError, match=message):
        convert(event)


def test_an_archived_line_reads_back_as_the_post_with_its_rules() -> None:
    event = post(T0, "3k01", "cat", embed=images("bafkreia1"))
    line = {"event": event, "cdn": CDN, "matching_rules": [{"id": "word:cat", "tag": "cats"}]}
    tweet = tweet_from_archived(line, source="replay", ingested_at_ms=2.0, replay_run_id="r")
    assert tweet == {
        **convert(event),
        "source": "replay",
        "ingested_at_ms": 2.0,
        "replay_run_id": "r",
        "matching_rules": [{"id": "word:cat", "tag": "cats"}],
    }
    with pytest.raises(CodecError):
        tweet_from_archived({"event": event}, source="replay", ingested_at_ms=2.0)


def test_a_parser_of_untrusted_input_raises_only_codec_errors() -> None:
    """What a network sends reaches the parsers from the live source and from the replay
    of its archive: a failure of any other type becomes a CodecError naming it (the
    replay used to end on one the live source had dead-lettered)."""

    @untrusted
    def parse(value: object) -> int:
        if value == "refused":
            raise CodecError("not a post")
        return len(value)  # type: ignore[arg-type]

    assert parse("abc") == 3 and parse.__name__ == "parse"
    with pytest.raises(CodecError, match="^not a post$"):
        parse("refused")
    with pytest.raises(CodecError, match=r"^TypeError: object of type 'int' has no len\(\)$"):
        parse(5)
    assert tweet_from_archived.__wrapped__ and tweet_from_event.__wrapped__  # both guarded


# The filter and the gate ---------------------------------------------------------------


def test_tag_filter_matches_hashtags_first_then_words() -> None:
    tags = TagFilter(["cats", "dogs", "sheep"])
    assert tags.hashtags() == ["cat", "cats", "dog", "dogs", "sheep"]
    assert tags.match(["Cats"], "look") == [{"id": "hashtag:cats", "tag": "cats"}]
    assert tags.match([], "A dog, and my CAT!") == [
        {"id": "word:cat", "tag": "cats"},
        {"id": "word:dog", "tag": "dogs"},
    ]
    assert tags.match(["sheepdog"], "concatenate") is None  # whole words only
    assert TagFilter(None).match([], "anything") == []
    with pytest.raises(ValueError):
        TagFilter([" ", ""])


def test_gate_keeps_image_posts_that_match_and_follows_them_to_edits_and_deletes() -> None:
    gate = PostGate(TagFilter(["cats"]), remember=2)

    def item(event: dict[str, Any]) -> Any:
        return gate.item(convert(event), raw={"event": event})

    kept = item(post(T0, "a", "my cat", embed=images("c1")))
    assert kept.tweet is not None and kept.tweet["matching_rules"] == [
        {"id": "word:cat", "tag": "cats"}
    ]
    assert kept.raw["matching_rules"] == kept.tweet["matching_rules"]  # archived with it
    assert item(post(T0, "b", "my dog", embed=images("c2"))).skipped == "no_match"
    assert item(post(T0, "c", "my cat")).skipped == "no_image"
    assert item(commit(T0, ALICE, "zz", operation="delete")).skipped == "delete_unseen"
    # An edit that took the photo away still goes on: its earlier results are retracted.
    bare = item(post(T0, "a", "my cat", operation="update"))
    assert bare.tweet is not None and bare.tweet["operation"] == "update"
    assert item(post(T0, "b", "dog", operation="update")).skipped == "no_image"
    gone = item(commit(T0, ALICE, "a", operation="delete"))
    assert gone.tweet is not None and gone.tweet["operation"] == "delete"
    assert item(commit(T0, ALICE, "a", operation="delete")).skipped == "delete_unseen"
    for rkey in ("d", "e", "f"):  # remembers only the last two posts
        item(post(T0, rkey, "cat", embed=images("c3")))
    assert item(commit(T0, ALICE, "d", operation="delete")).skipped == "delete_unseen"
    assert item(commit(T0, ALICE, "f", operation="delete")).tweet is not None


# The source over a WebSocket -----------------------------------------------------------

#: The posts the source keeps of `feed()` with the tags cats, dogs and cow.
KEPT = [at_uri(ALICE, "3k01"), at_uri(ALICE, "3k03"), at_uri(BOB, "3k05"), at_uri(ALICE, "3k07")]


def run_source(
    fake: FakeJetstream,
    *,
    positions: PositionFile | None = None,
    max_tweets: int | None = None,
    cursor: list[int] | None = None,
    idle_timeout_s: float = 5.0,
) -> tuple[Counter[str], RecordingProducer, Jetstream, Sleeps]:
    producer, sleeps = RecordingProducer(), Sleeps()

    async def main() -> tuple[Counter[str], Jetstream]:
        url = await fake.start()
        try:
            stream = Jetstream(url=url, cursor=cursor, sleep=sleeps, idle_timeout_s=idle_timeout_s)
            source = BlueskySource(stream, tags=TagFilter(["cats", "dogs", "cow"]), cdn_url=CDN)
            counts = await asyncio.wait_for(
                pump(source, producer, positions=positions, max_tweets=max_tweets),  # type: ignore[arg-type]
                20,
            )
            return counts, stream
        finally:
            await fake.stop()

    counts, stream = asyncio.run(main())
    return counts, producer, stream, sleeps


def test_every_image_post_once_across_drops_refusals_and_malformed_frames() -> None:
    events = feed()
    events[3]["commit"]["record"]["text"] = 42  # a post that is no post: a dead letter
    fake = FakeJetstream(
        events,
        [
            # Dropped between the two events of one microsecond (3k03 and 3k04).
            [("send", 5), ("raw", "{not json"), ("raw", b"(\xb5/\xfd zstd"), ("drop",)],
            [("http", 503)],
            [("send", 4), ("raw", json.dumps({"kind": "commit"})), ("close",)],
            [("send", 3), ("raw", "[1, 2]")],  # then silent: the idle timeout reconnects
            [("send", 5)],
        ],
    )
    moved = MetricDeltas()
    counts, producer, stream, sleeps = run_source(fake, max_tweets=len(KEPT), idle_timeout_s=0.5)

    sent = producer.of("tweets")
    assert Counter(t["id"] for t in sent if t["operation"] == "create") == Counter(KEPT)
    assert [(t["id"], t["operation"]) for t in sent if t["operation"] != "create"] == [
        (at_uri(ALICE, "3k01"), "delete"),
        (at_uri(ALICE, "3k03"), "update"),
    ]
    assert all(key == value["id"] for topic, key, value in producer.sent if topic == "tweets")
    # The accounting: the 13 events read (0..12) once each, each ending as one of these.
    assert counts["tweets"] == 4 and counts["updates"] == 1 and counts["deletes"] == 1
    assert counts["duplicates"] == 0 and counts["dead_letters"] == 1 + 4  # 4 non-events
    assert counts["skipped"] == 6
    assert counts["skipped_identity_event"] == counts["skipped_account_event"] == 1
    assert counts["skipped_other_collection"] == counts["skipped_delete_unseen"] == 1
    assert counts["skipped_no_image"] == counts["skipped_no_match"] == 1
    ended = sum(counts[k] for k in ("tweets", "updates", "deletes", "skipped", "dead_letters"))
    assert ended - 4 == 13
    # Each reconnect asked for the last event read, and dropped what it had read before.
    cursors = [q.get("cursor", [None])[0] for q in fake.queries]
    assert cursors == [None] + [str(events[i]["time_us"]) for i in (4, 4, 7, 8)]
    assert stream.counters["replayed"] == 1 + 1 + 2
    assert sleeps.delays == [1.0, 2.0, 1.0, 1.0]  # each frame read resets the back-off
    assert moved.delta("tagstream_source_reconnects_total", source="bluesky") == 4
    assert moved.delta("tagstream_source_backoff_seconds_total", source="bluesky") == 5.0
    assert moved.delta("tagstream_source_skipped_total", source="bluesky", reason="no_image") == 1
    assert stream.counters["http_503"] == 1 and stream.counters["stalls"] == 1
    letters = {d["payload"]: d for d in producer.of("deadletter")}
    assert {b"{not json", b"(\xb5/\xfd zstd", b'{"kind": "commit"}', b"[1, 2]"} < set(letters)
    assert "zstd" in letters[b"(\xb5/\xfd zstd"]["message"]
    assert all(d["stage"] == "bluesky" for d in letters.values())
    assert all(d["source_topic"] == "bluesky-jetstream" for d in letters.values())


def test_a_restart_resumes_after_the_last_delivered_event(tmp_path: Path) -> None:
    positions = PositionFile(tmp_path / "bluesky.json")
    events = feed()
    first = FakeJetstream(events, [[("send", len(events))]])
    counts, producer, _, _ = run_source(first, positions=positions, max_tweets=2)
    assert counts["tweets"] == 2
    saved = positions.load()
    assert saved == [events[4]["time_us"], 1]  # 3k03: the first of its microsecond
    second = FakeJetstream(events, [[("send", len(events))]])
    counts2, producer2, stream2, _ = run_source(second, positions=positions, max_tweets=2)
    assert second.queries[0]["cursor"] == [str(saved[0])]
    assert stream2.counters["replayed"] == 1  # 3k03 again, dropped; 3k04 is new
    creates = [t["id"] for t in producer.of("tweets") + producer2.of("tweets")]
    assert [i for i in creates if i != KEPT[1]] == [KEPT[0], KEPT[2], KEPT[3]]
    assert creates.count(KEPT[1]) == 2  # once, then its edit (an update)
    assert counts2["tweets"] == 2 and counts2["updates"] == 1
    # A new process does not know 3k01 was produced: its deletion is not forwarded.
    assert counts2["deletes"] == 0 and counts2["skipped_delete_unseen"] == 2
    # An explicit cursor wins over the saved position.
    third = FakeJetstream(events, [[("send", 1)]])
    run_source(third, positions=positions, cursor=[T0, 0], max_tweets=1)
    assert third.queries[0]["cursor"] == [str(T0)]


def test_a_refused_subscription_stops_with_a_clear_error() -> None:
    fake = FakeJetstream(feed(), [[("http", 400)]])
    with pytest.raises(BlueskyError, match="HTTP 400"):
        run_source(fake)


def test_the_stage_fetches_a_posts_photos_from_the_cdn_and_retracts_on_delete() -> None:
    """Downstream unchanged: the Faust agent's stage fetches a Bluesky post's photos with
    the safe fetcher from a CDN-shaped server (``@jpeg`` kept in the path), and turns
    its deletion into a retraction."""
    paths: list[str] = []

    async def photo(request: web.Request) -> web.Response:
        paths.append(request.raw_path)
        return web.Response(body=render_demo_jpeg("cats", 1), content_type="image/jpeg")

    async def main() -> tuple[list[Any], list[Any]]:
        app = web.Application()
        app.router.add_get("/img/{size}/plain/{did}/{blob}", photo)
        runner, cdn = await serve_locally(app)
        codec = Codec()
        try:
            settings = Settings(fetch_allow_hosts=["127.0.0.1"])
            async with ImageFetcher.from_settings(settings) as fetcher:
                stage = ShedAndFetch(
                    codec=codec,
                    fetcher=fetcher,
                    admission=AdmissionController(
                        target_s=2.0, ceiling_rate=9, ceiling_burst=9, mode="fixed"
                    ),
                )
                post_event = post(T0, "3k01", "cat", embed=images("bafkreia1", "bafkreib1"))
                created = tweet_from_event(
                    post_event, cdn_url=cdn, source="bluesky", ingested_at_ms=1.0
                )
                gone = convert(commit(T0 + 1, ALICE, "3k01", operation="delete"))
                where = SourceRef("tweets", 0, 0)
                made = await stage.process(Consumed(codec.encode("Tweet", created), where))
                retracted = await stage.process(Consumed(codec.encode("Tweet", gone), where))
                return made, retracted
        finally:
            await runner.cleanup()

    made, retracted = asyncio.run(main())
    assert [o.topic for o in made] == ["images", "images"]
    assert [o.key for o in made] == [f"{at_uri(ALICE, '3k01')}#bafkreia1",
                                     f"{at_uri(ALICE, '3k01')}#bafkreib1"]  # fmt: skip
    assert all(o.value["image"][:2] == b"\xff\xd8" for o in made)
    assert paths == [f"/img/feed_fullsize/plain/{ALICE}/bafkreia1@jpeg",
                     f"/img/feed_fullsize/plain/{ALICE}/bafkreib1@jpeg"]  # fmt: skip
    (withdrawal,) = retracted
    assert withdrawal.topic == "hashtags" and withdrawal.value["retraction"] is True
    assert withdrawal.key == at_uri(ALICE, "3k01")
