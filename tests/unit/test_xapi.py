"""The X API v2 filtered stream client against a fake X API served on 127.0.0.1.

`FakeXApi` is a real aiohttp app (nothing of aiohttp is mocked), scripted per stream
connection: it serves tweets from one feed with a cursor (so a reconnect resumes where
the last connection stopped), keep-alives, stalls, drops, 429/503, in-stream error
objects and malformed lines; its rules endpoints keep rules and record each POST.
Back-off is checked through an injected sleep that records and returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from infra.broker import free_port
from producers.tweets import tweet_from_stream_line
from producers.xapi import (
    STREAM_PARAMS,
    FilteredStream,
    MalformedLine,
    XApiError,
    general_rules,
    targeted_rules,
)
from schemas.records import photos
from tests.helpers import MetricDeltas, Sleeps, run_cli, serve_locally

TOKEN = "tok-very-secret-123"
Step = tuple[Any, ...]


def tweet_line(n: int, *, kinds: tuple[str, ...] = ("photo",)) -> dict[str, Any]:
    """A v2 stream line of tweet `n` with one media of each of `kinds`."""
    media = []
    for i, kind in enumerate(kinds):
        item: dict[str, Any] = {"media_key": f"3_{n}_{i}", "type": kind, "width": 640}
        if kind == "photo":
            item["url"] = f"https://pbs.example/media/{n}_{i}.jpg"
        else:
            # Videos and GIFs have only a preview, no url.
            item["preview_image_url"] = f"https://pbs.example/preview/{n}_{i}.jpg"
        media.append(item)
    return {
        "data": {
            "id": str(1000 + n),
            "text": f"tweet {n} &amp; a cow",
            "author_id": "42",
            "created_at": "2024-05-01T12:00:00.000Z",
            "attachments": {"media_keys": [m["media_key"] for m in media]},
        },
        "includes": {"media": media},
        "matching_rules": [{"id": "77", "tag": "cow"}],
    }


def mixed_feed(count: int) -> list[dict[str, Any]]:
    """Photo tweets, multi-photo tweets, and a video and a GIF tweet now and then."""
    kinds = [("photo",), ("photo", "photo", "photo"), ("video",), ("photo",), ("animated_gif",)]
    return [tweet_line(n, kinds=kinds[n % len(kinds)]) for n in range(count)]


def wire(line: dict[str, Any]) -> bytes:
    return json.dumps(line).encode() + b"\r\n"


KEEPALIVE: Step = ("raw", b"\r\n")


class FakeXApi:
    """A scripted X API v2: stream connections follow `scripts`, then stall.

    Steps: ``("tweets", n)`` the next n feed lines; ``("raw", bytes)``; ``("pause", s)``;
    ``("drop",)`` half of the next feed line, then the connection is cut; ``("stall",)``
    nothing until the client leaves; ``("replay", k)`` move the cursor back k lines (the
    API's backfill on reconnect); ``("status", code, headers, body)`` as the only step.
    """

    def __init__(
        self,
        feed: list[dict[str, Any]] | None = None,
        scripts: list[list[Step]] | None = None,
        rules: list[dict[str, str]] | None = None,
    ) -> None:
        self.feed = feed or []
        self.cursor = 0
        self.scripts = list(scripts or [])
        self.stream_requests: list[dict[str, Any]] = []
        self.rule_posts: list[tuple[dict[str, Any], bool]] = []
        self.rules = {r["id"]: dict(r) for r in rules or []}
        self._next_id = 1000
        self.runner: web.AppRunner | None = None

    async def start(self, port: int | None = None) -> str:
        app = web.Application()
        app.router.add_get("/2/tweets/search/stream", self.stream)
        app.router.add_get("/2/tweets/search/stream/rules", self.get_rules)
        app.router.add_post("/2/tweets/search/stream/rules", self.post_rules)
        self.runner, url = await serve_locally(app, port=port)
        return url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def get_rules(self, request: web.Request) -> web.Response:
        rules = list(self.rules.values())
        body: dict[str, Any] = {"meta": {"result_count": len(rules)}}
        if rules:
            body["data"] = rules
        return web.json_response(body)

    async def post_rules(self, request: web.Request) -> web.Response:
        body = await request.json()
        dry_run = request.query.get("dry_run") == "true"
        self.rule_posts.append((body, dry_run))
        errors = [
            {"title": "Invalid Rule", "value": r["value"]}
            for r in body.get("add", [])
            if "INVALID" in r["value"]
        ]
        if errors:
            return web.json_response({"errors": errors, "meta": {"summary": {"invalid": 1}}})
        if not dry_run:
            for rule_id in body.get("delete", {}).get("ids", []):
                self.rules.pop(rule_id, None)
            for rule in body.get("add", []):
                self._next_id += 1
                self.rules[str(self._next_id)] = {"id": str(self._next_id), **rule}
        return web.json_response({"meta": {"summary": {"created": len(body.get("add", []))}}})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.stream_requests.append(
            {"query": dict(request.query), "auth": request.headers.get("Authorization")}
        )
        script = self.scripts.pop(0) if self.scripts else [("stall",)]
        if script[0][0] == "status":
            _, code, headers, body = script[0]
            return web.Response(status=code, headers=headers, text=body)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for step in script:
            if step[0] == "tweets":
                for _ in range(step[1]):
                    await response.write(wire(self.feed[self.cursor]))
                    self.cursor += 1
            elif step[0] == "raw":
                await response.write(step[1])
            elif step[0] == "pause":
                await asyncio.sleep(step[1])
            elif step[0] == "replay":
                self.cursor -= step[1]
            elif step[0] == "drop":
                line = wire(self.feed[self.cursor])
                await response.write(line[: len(line) // 2])
                await asyncio.sleep(0.02)  # let the half line leave before the cut
                assert request.transport is not None
                request.transport.close()
                return response
            elif step[0] == "stall":
                for _ in range(500):
                    if request.transport is None or request.transport.is_closing():
                        break
                    await asyncio.sleep(0.02)
                return response
        await response.write_eof()
        return response


def with_fake(fake: FakeXApi, body: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        base = await fake.start()
        try:
            await asyncio.wait_for(body(base), 15)
        finally:
            await fake.stop()

    asyncio.run(main())


def client(base: str, **overrides: Any) -> FilteredStream:
    options: dict[str, Any] = {
        "base_url": base,
        "bearer_token": SecretStr(TOKEN),
        "sleep": Sleeps(),
        "keepalive_timeout_s": 2.0,
    }
    options.update(overrides)
    return FilteredStream(**options)


async def take(stream: FilteredStream, n: int) -> list[dict[str, Any] | MalformedLine]:
    items: list[dict[str, Any] | MalformedLine] = []
    async with contextlib.aclosing(stream.stream_lines()) as lines:
        async for item in lines:
            items.append(item)
            if len(items) == n:
                break
    return items


def ids(items: list[Any]) -> list[str]:
    return [i["data"]["id"] for i in items if isinstance(i, dict)]


# Stream: lines, reconnects, back-off --------------------------------------------------


def test_lines_arrive_once_in_order_across_drops_and_server_ends() -> None:
    feed = mixed_feed(10)
    fake = FakeXApi(
        feed,
        [
            [KEEPALIVE, ("tweets", 3), KEEPALIVE, ("drop",)],
            [("tweets", 2), KEEPALIVE, KEEPALIVE],  # then the server ends the response
            [("tweets", 5)],
        ],
    )

    async def body(base: str) -> None:
        async with client(base) as stream:
            items = await take(stream, 10)
            assert ids(items) == [line["data"]["id"] for line in feed]
            assert items == feed
            # A drop and an end are network failures; each 200 restarts the schedule.
            assert stream.backoffs == [0.25, 0.25]
            assert stream.counters["keepalives"] == 4
            assert stream.counters["truncated_lines"] == 1
            assert stream.counters["connections"] == 3
        for request in fake.stream_requests:
            assert request["auth"] == f"Bearer {TOKEN}"
            assert request["query"] == STREAM_PARAMS

    with_fake(fake, body)
    # The lines are the API's shape: photos keep their urls, videos and GIFs have none.
    tweets = [tweet_from_stream_line(line, source="twitter", ingested_at_ms=0) for line in feed]
    assert [len(photos(t)) for t in tweets[:5]] == [1, 3, 0, 1, 0]
    assert tweets[2]["media"][0]["url"] is None


def test_network_errors_back_off_linearly_up_to_16_s() -> None:
    async def body() -> None:
        # Nothing listens on this port: every connect is refused at once.
        stream = client(f"http://127.0.0.1:{free_port()}", max_reconnects=70)
        moved = MetricDeltas()
        async with stream:
            with pytest.raises(XApiError, match="gave up after 70 reconnects"):
                await take(stream, 1)
        assert stream.backoffs == [min(0.25 * n, 16.0) for n in range(1, 71)]
        assert moved.delta("tagstream_source_reconnects_total", source="twitter") == 70
        backoff = moved.delta("tagstream_source_backoff_seconds_total", source="twitter")
        assert backoff == pytest.approx(sum(stream.backoffs))
        assert stream.backoffs[63:] == [16.0] * 7
        assert stream.counters["network_errors"] == 71

    asyncio.run(body())


def test_stall_reconnects_after_keepalive_timeout_and_keepalives_hold_it_off() -> None:
    feed = mixed_feed(2)
    fake = FakeXApi(
        feed,
        [
            # 0.6 s without a tweet, but a keep-alive every 0.2 s: no reconnect until
            # the stall.
            [("tweets", 1), ("pause", 0.2), KEEPALIVE, ("pause", 0.2), KEEPALIVE]
            + [("pause", 0.2), ("stall",)],
            [("tweets", 1)],
        ],
    )

    async def body(base: str) -> None:
        async with client(base, keepalive_timeout_s=0.3) as stream:
            items = await take(stream, 2)
            assert items == feed
            assert stream.counters["stalls"] == 1
            assert stream.counters["keepalives"] == 2
            assert stream.backoffs == [0.25]

    with_fake(fake, body)


def test_http_errors_back_off_exponentially_to_320_s_and_reset_after_a_connection() -> None:
    unavailable: list[Step] = [("status", 503, {}, "Service Unavailable")]
    fake = FakeXApi(
        mixed_feed(2),
        [unavailable] * 8 + [[("tweets", 1)], unavailable, [("tweets", 1)]],
    )

    async def body(base: str) -> None:
        async with client(base) as stream:
            assert len(await take(stream, 2)) == 2
            assert stream.backoffs == [5, 10, 20, 40, 80, 160, 320, 320, 0.25, 5]
            assert stream.counters["http_503"] == 9

    with_fake(fake, body)


def test_429_backs_off_from_60_s_and_waits_for_a_later_rate_limit_reset() -> None:
    now = 1_700_000_000.0

    def limited(reset: float | None) -> list[Step]:
        headers = {"x-rate-limit-reset": str(int(reset))} if reset else {}
        return [("status", 429, headers, '{"title": "Too Many Requests"}')]

    fake = FakeXApi(
        mixed_feed(1),
        [limited(now + 90), limited(now + 10), limited(None), [("tweets", 1)]],
    )

    async def body(base: str) -> None:
        async with client(base, wall_clock=lambda: now) as stream:
            assert len(await take(stream, 1)) == 1
            # reset later than 60 s wins; an earlier reset does not shorten the back-off.
            assert stream.backoffs == [90, 120, 240]
            assert stream.counters["http_429"] == 3

    with_fake(fake, body)


def test_in_stream_errors_are_counted_and_reconnected_and_malformed_lines_marked() -> None:
    disconnect = {
        "errors": [
            {
                "title": "operational-disconnect",
                "disconnect_type": "UpstreamOperationalDisconnect",
                "detail": "This stream has been disconnected upstream for operational reasons.",
                "type": "https://api.twitter.com/2/problems/operational-disconnect",
            }
        ]
    }
    too_many = {
        "errors": [
            {
                "title": "ConnectionException",
                "connection_issue": "TooManyConnections",
                "detail": "This stream is currently at the maximum allowed connection limit.",
            }
        ]
    }
    feed = mixed_feed(3)
    fake = FakeXApi(
        feed,
        [
            [("tweets", 1), ("raw", wire(disconnect))],
            [("raw", wire(too_many))],
            [("tweets", 1), ("raw", b'{"data": {"id": "9", "te\r\n'), ("raw", b"[1, 2]\r\n")]
            + [("tweets", 1)],
        ],
    )

    async def body(base: str) -> None:
        async with client(base) as stream:
            items = await take(stream, 5)
            assert ids(items) == ["1000", "1001", "1002"]
            assert items[2] == MalformedLine(raw=b'{"data": {"id": "9", "te', error=items[2].error)
            assert "not JSON" in items[2].error
            assert isinstance(items[3], MalformedLine) and items[3].raw == b"[1, 2]"
            assert stream.counters["stream_error:operational-disconnect"] == 1
            assert stream.counters["stream_error:ConnectionException"] == 1
            assert stream.counters["malformed"] == 2
            # The 200 before each error object does not restart that schedule.
            assert stream.backoffs == [5, 10]

    with_fake(fake, body)


# The token --------------------------------------------------------------------------


def test_token_is_only_in_the_authorization_header(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def echo_token(request: web.Request) -> web.Response:
        # A badly behaved server that echoes the request's header into its error.
        return web.Response(status=401, text=f"bad {request.headers['Authorization']}")

    fake = FakeXApi(
        mixed_feed(1),
        [[("status", 503, {}, "")], [("drop",)], [("status", 429, {}, "")]],
    )

    async def body(base: str) -> None:
        async with client(base) as stream:
            assert TOKEN not in repr(stream)
            assert TOKEN not in str(vars(stream))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(take(stream, 1), 1.0)
            assert len(stream.backoffs) == 3
        assert fake.stream_requests[0]["auth"] == f"Bearer {TOKEN}"

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo_token)
        runner, url = await serve_locally(app)
        try:
            async with client(url) as stream:
                for call in (stream.get_rules(), take(stream, 1)):
                    with pytest.raises(XApiError) as raised:
                        await call
                    assert "401" in str(raised.value)
                    assert TOKEN not in str(raised.value) and TOKEN not in repr(raised.value)
                    assert raised.value.__cause__ is None
        finally:
            await runner.cleanup()

    with_fake(fake, body)
    assert "reconnecting" in caplog.text
    assert TOKEN not in caplog.text


def test_token_must_be_a_secret() -> None:
    with pytest.raises(TypeError):
        FilteredStream(base_url="http://x", bearer_token=TOKEN)  # type: ignore[arg-type]


# Rules ------------------------------------------------------------------------------


def test_targeted_and_general_rules() -> None:
    rules = targeted_rules()
    tags = [r["tag"] for r in rules]
    assert "cow" in tags and "others" not in tags and len(tags) == 12
    by_tag = {r["tag"]: r["value"] for r in rules}
    assert by_tag["cow"] == "(cow OR cows OR #cow) has:images -is:retweet"
    assert by_tag["cats"] == "(cat OR cats OR #cat) has:images -is:retweet"
    assert by_tag["sheep"] == "(sheep OR #sheep) has:images -is:retweet"
    assert targeted_rules(["fox"]) == [
        {"value": "(fox OR foxes OR #fox) has:images -is:retweet", "tag": "fox"}
    ]
    assert all(len(r["value"]) <= 512 for r in rules)
    general = general_rules()
    assert len(general) >= 2 and all("has:images" in r["value"] for r in general)


def test_sync_rules_keeps_wanted_deletes_unwanted_adds_missing() -> None:
    wanted = targeted_rules(["cow", "cats", "sheep"])
    cow, cats, sheep = wanted
    existing = [
        {"id": "1", **cow},  # wanted: kept
        {"id": "2", "value": "old rule has:images", "tag": "old"},  # unwanted
        {"id": "3", "value": cats["value"], "tag": "kittens"},  # wanted value, wrong tag
    ]

    async def body(base: str) -> None:
        moved = MetricDeltas()
        async with client(base) as stream:
            dry = await stream.sync_rules(wanted, dry_run=True)
            assert fake.rule_posts == [
                ({"delete": {"ids": ["2", "3"]}}, True),
                ({"add": [cats, sheep]}, True),
            ]
            assert sorted(fake.rules) == ["1", "2", "3"]  # nothing changed
            assert dry["dry_run"] and dry["added"] == [cats, sheep]

            fake.rule_posts.clear()
            result = await stream.sync_rules(wanted)
            assert fake.rule_posts == [
                ({"delete": {"ids": ["2", "3"]}}, False),
                ({"add": [cats, sheep]}, False),
            ]
            assert result["kept"] == [existing[0]] and result["deleted"] == ["2", "3"]
            now = await stream.get_rules()
            assert sorted((r["value"], r["tag"]) for r in now) == sorted(
                (r["value"], r["tag"]) for r in wanted
            )
            assert any(r["id"] == "1" for r in now)  # the kept rule was never touched

            fake.rule_posts.clear()
            again = await stream.sync_rules(wanted)
            assert fake.rule_posts == [] and len(again["kept"]) == 3

            with pytest.raises(XApiError, match="Invalid Rule"):
                await stream.sync_rules(wanted + [{"value": "INVALID (", "tag": "x"}])
        # Every call to the rules endpoint, counted: 5 reads, 5 changes (or checks).
        calls = "tagstream_source_rule_sync_calls_total"
        assert moved.delta(calls, method="GET", outcome="http_2xx") == 5
        assert moved.delta_sum(calls, method="POST") == 5

    fake = FakeXApi(rules=existing)
    with_fake(fake, body)


# CLI --------------------------------------------------------------------------------


def test_cli_without_a_token_exits_with_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TAGSTREAM_X_BEARER_TOKEN", raising=False)
    assert run_cli(monkeypatch, {}, "produce", "twitter") == 2
    assert "TAGSTREAM_X_BEARER_TOKEN is not set" in capsys.readouterr().err


def test_cli_dry_run_only_validates_the_rules(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import BackgroundLoop

    fake = FakeXApi(rules=[{"id": "9", "value": "stale has:images", "tag": "stale"}])
    background = BackgroundLoop()
    try:
        base = background.run(fake.start())
        env = {"TAGSTREAM_X_API_BASE_URL": base, "TAGSTREAM_X_BEARER_TOKEN": TOKEN}
        rc = run_cli(monkeypatch, env, "produce", "twitter", "--rules", "general", "--dry-run")
        background.run(fake.stop())
    finally:
        background.close()
    assert rc == 0
    assert fake.rule_posts == [
        ({"delete": {"ids": ["9"]}}, True),
        ({"add": general_rules()}, True),
    ]
    assert list(fake.rules) == ["9"]  # nothing changed
    assert fake.stream_requests == []  # and nothing streamed
    out = capsys.readouterr().out
    assert "dry run" in out and "rules_added=2" in out and TOKEN not in out
