"""The Mastodon source against a fake instance that speaks the streaming API's wire format
(server-sent events over real HTTP, no broker): statuses to Tweet records, the streaming
server's discovery, heartbeats, a 429 and the instance's ``retry:``, drops, malformed
events, deletions and edits, two hashtag streams merged, and the token kept secret."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from infra.exceptions import CodecError
from producers.mastodon import (
    Event,
    MastodonError,
    MastodonSource,
    MastodonStreams,
    plain_text,
    status_key,
    streams_for,
    tweet_from_archived,
    tweet_from_event,
)
from producers.posts import TagFilter
from producers.source import pump
from tests.helpers import MetricDeltas, RecordingProducer, Sleeps, serve_locally

HOST = "social.example"


def status(
    status_id: str,
    *,
    tags: tuple[str, ...] = (),
    images: int = 1,
    kinds: tuple[str, ...] = (),
    text: str = "",
    edited_at: str | None = None,
) -> dict[str, Any]:
    """A status as the streaming API sends it (the fields tagstream reads, and more)."""
    attachments = [
        {
            "id": f"{status_id}{i}",
            "type": kind,
            "url": f"https://files.{HOST}/media/{status_id}{i}/original.jpg",
            "preview_url": f"https://files.{HOST}/media/{status_id}{i}/small.jpg",
            "remote_url": None,
            "description": f"alt {i}" if i == 0 else None,
            "blurhash": "UFF~d^%2",
            "meta": {"original": {"width": 1200, "height": 900}, "small": {"width": 400}},
        }
        for i, kind in enumerate(("image",) * images + kinds)
    ]
    hashtags = " ".join(f'<a href="https://{HOST}/tags/{t}" class="hashtag">#<span>{t}</span></a>'
                        for t in tags)  # fmt: skip
    return {
        "id": status_id,
        "created_at": "2024-09-09T19:46:02.000Z",
        "in_reply_to_id": None,
        "sensitive": False,
        "spoiler_text": "",
        "visibility": "public",
        "language": "en",
        "uri": f"https://{HOST}/users/ana/statuses/{status_id}",
        "url": f"https://{HOST}/@ana/{status_id}",
        "edited_at": edited_at,
        "content": f"<p>{text or 'look'} &amp; see<br>{hashtags}</p>",
        "reblog": None,
        "account": {
            "id": "1090",
            "username": "ana",
            "acct": "ana",
            "uri": f"https://{HOST}/users/ana",
            "url": f"https://{HOST}/@ana",
        },
        "media_attachments": attachments,
        "mentions": [],
        "tags": [{"name": t.lower(), "url": f"https://{HOST}/tags/{t.lower()}"} for t in tags],
        "emojis": [],
    }


class FakeInstance:
    """A Mastodon instance on loopback: ``/api/v2/instance`` names its streaming server
    (itself, as ``ws://``), and ``/api/v1/streaming/...`` serves server-sent events. Each
    stream (``public``, ``hashtag:<tag>``) plays one script per connection, then stalls:
    ``("event", kind, data)`` (a dict is sent as JSON, split over two ``data:`` lines
    when `split`), ``(":", text)`` a heartbeat, ``("retry", ms)``, ``("raw", bytes)``,
    ``("drop",)`` cut mid-event, ``("end",)``, ``("stall",)``, ``("http", status,
    headers)`` as the only step. With `token`, streams answer 401 without it."""

    def __init__(
        self,
        scripts: dict[str, list[list[tuple]]],
        *,
        token: str | None = None,
        discovery: str = "v2",
    ) -> None:
        self.scripts = scripts
        self.token = token
        self.discovery = discovery
        self.requests: list[tuple[str, str | None]] = []  # (stream, Authorization)
        self.queries: list[dict[str, str]] = []
        self._count: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v2/instance", self.instance_v2)
        app.router.add_get("/api/v1/instance", self.instance_v1)
        app.router.add_get("/api/v1/streaming/{stream:.+}", self.stream)
        self.runner, self.url = await serve_locally(app)
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def instance_v2(self, request: web.Request) -> web.Response:
        if self.discovery != "v2":
            raise web.HTTPNotFound()
        streaming = self.url.replace("http://", "ws://")
        body = {"domain": HOST, "configuration": {"urls": {"streaming": streaming}}}
        return web.json_response(body)

    async def instance_v1(self, request: web.Request) -> web.Response:
        if self.discovery != "v1":
            raise web.HTTPNotFound()
        body = {"uri": HOST, "urls": {"streaming_api": self.url.replace("http", "ws")}}
        return web.json_response(body)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["stream"]
        key = f"hashtag:{request.query['tag']}" if name == "hashtag" else name
        self.requests.append((key, request.headers.get("Authorization")))
        self.queries.append(dict(request.query))
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            error = {"error": "This API requires an authenticated user"}
            return web.json_response(error, status=401)
        n = self._count[key]
        self._count[key] += 1
        scripts = self.scripts.get(key, [])
        script = scripts[n] if n < len(scripts) else [("stall",)]
        if script[0][0] == "http":
            return web.Response(status=script[0][1], headers=script[0][2], text="{}")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b":)\n")
        for step in script:
            if step[0] == "event":
                _, kind, data = step
                if isinstance(data, dict):
                    text = json.dumps(data, indent=None)
                    half = text.index(', "created_at"')  # two data lines: joined with \n
                    lines = f"data: {text[: half + 1]}\ndata: {text[half + 1 :]}\n"
                else:
                    lines = f"data: {data}\n"
                await response.write(f"event: {kind}\n{lines}\n".encode())
            elif step[0] == ":":
                await response.write(f":{step[1]}\n".encode())
            elif step[0] == "retry":
                await response.write(f"retry: {step[1]}\n\n".encode())
            elif step[0] == "raw":
                await response.write(step[1])
            elif step[0] == "drop":
                await response.write(b'event: update\ndata: {"id": "9')
                await asyncio.sleep(0.02)
                assert request.transport is not None
                request.transport.close()
                return response
            elif step[0] == "end":
                break
            elif step[0] == "stall":
                for _ in range(500):
                    if request.transport is None or request.transport.is_closing():
                        break
                    await asyncio.sleep(0.02)
                return response
        await response.write_eof()
        return response


# Statuses to records -------------------------------------------------------------------


def convert(kind: str, data: Any, stream: str = "public") -> Any:
    text = data if isinstance(data, str) else json.dumps(data)
    return tweet_from_event(
        Event(stream, kind, text), host=HOST, source="mastodon", ingested_at_ms=1.0
    )


def test_a_status_with_images_becomes_a_tweet() -> None:
    tweet = convert("update", status("1131", tags=("Cats",), images=2, kinds=("gifv", "video")))
    assert tweet["id"] == "mastodon:social.example:1131" and tweet["post_id"] == "1131"
    assert tweet["network"] == "mastodon" and tweet["operation"] == "create"
    assert tweet["text"] == "look & see\n#Cats"
    assert tweet["post_url"] == f"https://{HOST}/@ana/1131"
    assert tweet["author_id"] == f"https://{HOST}/users/ana"
    assert tweet["langs"] == ["en"] and tweet["tags"] == ["cats"] and tweet["revision"] is None
    photo, second, gif, video = tweet["media"]
    assert photo["media_key"] == "mastodon:social.example:11310" and photo["type"] == "photo"
    assert photo["url"] == f"https://files.{HOST}/media/11310/original.jpg"
    assert photo["preview_image_url"] == f"https://files.{HOST}/media/11310/small.jpg"
    assert (photo["width"], photo["height"], photo["alt_text"]) == (1200, 900, "alt 0")
    assert second["alt_text"] is None
    assert (gif["type"], gif["url"], video["type"], video["url"]) == (
        "animated_gif", None, "video", None
    )  # fmt: skip
    edited = convert("status.update", status("1131", edited_at="2024-09-10T08:00:00.000Z"))
    assert edited["operation"] == "update" and edited["revision"] == "2024-09-10T08:00:00.000Z"
    gone = convert("delete", "1131")
    assert gone["operation"] == "delete" and gone["id"] == tweet["id"] and gone["media"] == []
    assert plain_text("<p>a<br/>b</p><p>c &lt;3</p>") == "a\nb\n\nc <3"


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("update", "{oops", "not JSON"),
        ("update", "[1]", "JSON object"),
        ("update", json.dumps({"content": "<p>x</p>"}), "'id'"),
        ("update", json.dumps({**status("1"), "content": None}), "'content'"),
        ("update", json.dumps({**status("1"), "account": "ana"}), "'account'"),
        ("update", json.dumps({**status("1"), "media_attachments": [{"type": "image"}]}), "'id'"),
        ("delete", "", "status id"),
        ("notification", "{}", "no status"),
    ],
)
def test_malformed_events_raise_codec_errors(kind: str, data: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        convert(kind, data)


def test_an_archived_line_reads_back_as_the_post_with_its_rules() -> None:
    data = json.dumps(status("7", tags=("cat",)))
    line = {
        "host": HOST,
        "stream": "hashtag:cat",
        "event": "update",
        "data": data,
        "matching_rules": [{"id": "hashtag:cat", "tag": "cats"}],
    }
    tweet = tweet_from_archived(line, source="replay", ingested_at_ms=2.0, replay_run_id="r")
    assert tweet["id"] == status_key(HOST, "7") and tweet["source"] == "replay"
    assert tweet["matching_rules"] == [{"id": "hashtag:cat", "tag": "cats"}]
    assert tweet["replay_run_id"] == "r"
    with pytest.raises(CodecError):
        tweet_from_archived({**line, "host": None}, source="replay", ingested_at_ms=2.0)


# The source over server-sent events ----------------------------------------------------


def run(
    fake: FakeInstance,
    tags: list[str] | None,
    *,
    token: str | None = None,
    until: int | None = None,
) -> tuple[Counter[str], RecordingProducer, MastodonStreams, Sleeps]:
    """Pump the source until `until` records were produced (None: until it stops)."""
    producer, sleeps = RecordingProducer(), Sleeps()
    tag_filter = TagFilter(tags)

    async def main() -> tuple[Counter[str], MastodonStreams]:
        base = await fake.start()
        try:
            streams = MastodonStreams(
                instance=base,
                streams=streams_for(tag_filter),
                token=SecretStr(token) if token else None,
                sleep=sleeps,
                heartbeat_timeout_s=5.0,
            )
            stop = asyncio.Event()

            async def watch() -> None:
                while until is None or len(producer.sent) < until:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # nothing more may come
                stop.set()

            watcher = asyncio.create_task(watch())
            source = MastodonSource(streams, tags=tag_filter)
            try:
                counts = await asyncio.wait_for(pump(source, producer, stop=stop), 15)  # type: ignore[arg-type]
            finally:
                watcher.cancel()
            return counts, streams
        finally:
            await fake.stop()

    counts, streams = asyncio.run(main())
    return counts, producer, streams, sleeps


def test_two_hashtag_streams_every_image_post_once_across_drops_and_a_429() -> None:
    s1, s4 = status("101", tags=("cat",)), status("104", tags=("cat", "cats"))
    fake = FakeInstance(
        {
            "hashtag:cat": [
                [
                    ("event", "update", s1),
                    (":", "thump"),
                    ("event", "update", status("102", tags=("cat",), images=0)),
                    ("event", "update", "{oops"),
                    ("event", "notification", json.dumps({"id": "5", "type": "mention"})),
                    ("event", "update", status("103", tags=("cat",), images=0, kinds=("gifv",))),
                    ("drop",),
                ],
                [("http", 429, {"Retry-After": "7"})],
                [
                    ("event", "update", s4),
                    ("event", "status.update", {**s1, "edited_at": "2024-09-10T08:00:00Z"}),
                    ("event", "delete", "101"),
                    ("event", "delete", "999"),
                    ("event", "update", status("105", tags=("dog",))),  # no match
                    ("retry", 1500),
                    ("end",),
                ],
                [("event", "update", status("106", text="a cat", tags=("cat",))), ("stall",)],
            ],
            "hashtag:cats": [
                [
                    ("event", "update", s4),
                    (":", "thump"),
                    ("event", "update", status("107", tags=("cats",))),
                    ("stall",),
                ]
            ],
        }
    )
    moved = MetricDeltas()
    counts, producer, streams, sleeps = run(fake, ["cats"], until=7)

    def key(status_id: str) -> str:  # the instance is on loopback here
        return status_key(streams.host, status_id)

    assert streams.host == fake.url.removeprefix("http://")
    creates = Counter(t["id"] for t in producer.of("tweets") if t["operation"] == "create")
    assert creates == Counter(key(i) for i in ("101", "104", "106", "107"))
    later = [(t["id"], t["operation"]) for t in producer.of("tweets") if t["operation"] != "create"]
    assert later == [(key("101"), "update"), (key("101"), "delete")]
    assert all(k == value["id"] for topic, k, value in producer.sent if topic == "tweets")
    # The accounting: 13 status events read, each ending as exactly one of these.
    assert counts["tweets"] == 4 and counts["updates"] == 1 and counts["deletes"] == 1
    assert counts["duplicates"] == 1  # 104, read from both streams
    assert counts["dead_letters"] == 1
    assert counts["skipped_no_image"] == 2 and counts["skipped_other_event"] == 1
    assert counts["skipped_delete_unseen"] == 1 and counts["skipped_no_match"] == 1
    ended = sum(counts[k] for k in ("tweets", "updates", "deletes", "duplicates", "skipped"))
    assert ended + counts["dead_letters"] == 13
    rules = {t["id"]: t["matching_rules"] for t in producer.of("tweets")}
    assert rules[key("104")] == [{"id": "hashtag:cat", "tag": "cats"}]
    assert rules[key("106")] == [{"id": "hashtag:cat", "tag": "cats"}]
    # The drop backs off 1 s, the 429 waits its Retry-After, the end waits the `retry:`.
    assert sleeps.delays == [1.0, 7.0, 1.5]
    assert moved.delta("tagstream_source_reconnects_total", source="mastodon") == 3
    assert moved.delta("tagstream_source_backoff_seconds_total", source="mastodon") == 9.5
    assert moved.delta("tagstream_source_duplicates_total", source="mastodon") == 1
    assert streams.counters["http_429"] == 1 and streams.counters["heartbeats"] >= 6
    assert sorted({stream for stream, _ in fake.requests}) == ["hashtag:cat", "hashtag:cats"]
    (letter,) = producer.of("deadletter")
    assert letter["payload"] == b"{oops" and letter["stage"] == "mastodon"
    assert letter["source_topic"] == f"mastodon:{streams.host}/hashtag:cat"


def test_an_instance_that_needs_a_token_says_so_and_the_token_is_never_shown(caplog) -> None:
    fake = FakeInstance({}, token="s3cret-token", discovery="v1")
    with pytest.raises(MastodonError, match="needs an access token.*--token"):
        run(fake, None)
    assert fake.requests == [("public", None)]

    secret = "s3cret-token"
    fake = FakeInstance(
        {"public": [[("event", "update", status("201")), ("stall",)]]},
        token=secret,
        discovery="v1",
    )
    caplog.set_level(logging.DEBUG)
    counts, producer, streams, _ = run(fake, None, token=secret, until=1)
    assert counts["tweets"] == 1 and producer.of("tweets")[0]["matching_rules"] == []
    assert fake.requests == [("public", f"Bearer {secret}")]
    assert fake.queries == [{"only_media": "true"}]  # the server leaves out the rest
    assert secret not in repr(streams) and secret not in caplog.text
    with pytest.raises(MastodonError, match="refused the token"):
        run(FakeInstance({}, token="another"), None, token=secret)


def test_server_errors_back_off_and_a_missing_stream_stops() -> None:
    fake = FakeInstance(
        {
            "public": [
                [("http", 503, {})],
                [("http", 502, {})],
                [("event", "update", status("301")), ("stall",)],
            ]
        },
        discovery="none",  # no instance API: the instance serves its own streams
    )
    counts, _, streams, sleeps = run(fake, None, until=1)
    assert counts["tweets"] == 1 and sleeps.delays == [5.0, 10.0]
    assert streams.streaming_url == fake.url
    with pytest.raises(MastodonError, match="HTTP 404"):
        run(FakeInstance({"public": [[("http", 404, {})]]}), None)
