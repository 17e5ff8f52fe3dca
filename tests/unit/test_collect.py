"""`tagstream collect` against a fake X API recent search and a real image host on 127.0.0.1.

`FakeSearch` is a real aiohttp app serving scripted result pages per query with
``next_token`` paging, and recording every request; answers (429, 5xx, 401) can be
injected before a given page. The image host is the project's demo image server (its
fault routes: 404, HTML served as a JPEG, corrupt JPEG) with three more routes: the same
bytes under another URL, the same picture re-encoded smaller, and a PNG. Waits go through
an injected sleep that records and returns at once.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from pydantic import SecretStr

from infra.demo_images import DEMO_CLASSES, render_demo_image, render_demo_jpeg
from infra.exceptions import ConfigurationError, DecodeImageError
from infra.image_server import make_image_app
from infra.settings import Settings
from producers.collect import (
    DEFAULT_NEAR_THRESHOLD,
    SEARCH_PARAMS,
    RecentSearch,
    collect,
    examine_image,
    hamming,
    parse_tags,
    perceptual_hash,
    search_queries,
)
from producers.xapi import XApiError
from tests.helpers import Sleeps, run_cli, serve_locally

TOKEN = "tok-very-secret-456"
CATS_TAG, CATS_WORDS = search_queries("cats")
DOGS_TAG, DOGS_WORDS = search_queries("dogs")
NOW = 1_700_000_000.0

Media = tuple[str, str | None]  # (type, image path or None)
Tweet = tuple[str, list[Media]]


def photo(path: str) -> Media:
    return ("photo", path)


VIDEO: Media = ("video", None)
GIF: Media = ("animated_gif", None)


def media_key(tweet_id: str, i: int) -> str:
    return f"3_{tweet_id}_{i}"


def saved_name(tweet_id: str) -> str:
    """The file a tweet's first photo is saved as."""
    return f"{tweet_id}_{media_key(tweet_id, 0)}.jpg"


class FakeSearch:
    """``GET /2/tweets/search/recent`` serving `results[query]` pages, ``next_token`` p1, p2...

    `inject[n]` lists answers ``(status, headers, body)`` given, one per request, before
    the page served n-th (0 = the first); ``{auth}`` in a body echoes the header back.
    """

    def __init__(self, results: dict[str, list[list[Tweet]]]) -> None:
        self.results = results
        self.inject: dict[int, list[tuple[int, dict[str, str], str]]] = {}
        self.requests: list[tuple[str | None, str | None]] = []
        self.seen: list[dict[str, Any]] = []
        self.served = 0
        self.image_base = ""
        self.runner: web.AppRunner | None = None

    async def start(self, image_base: str) -> str:
        self.image_base = image_base
        app = web.Application()
        app.router.add_get("/2/tweets/search/recent", self.search)
        self.runner, url = await serve_locally(app)
        return url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def search(self, request: web.Request) -> web.Response:
        query, token = request.query.get("query"), request.query.get("next_token")
        self.requests.append((query, token))
        auth = request.headers.get("Authorization", "")
        self.seen.append({"auth": auth, "params": dict(request.query)})
        pending = self.inject.get(self.served)
        if pending:
            status, headers, body = pending.pop(0)
            return web.Response(status=status, headers=headers, text=body.replace("{auth}", auth))
        if auth != f"Bearer {TOKEN}":
            return web.json_response({"title": "Unauthorized"}, status=401)
        pages = self.results.get(query or "", [])
        index = int(token[1:]) if token else 0
        self.served += 1
        tweets = pages[index] if index < len(pages) else []
        next_token = f"p{index + 1}" if index + 1 < len(pages) else None
        return web.json_response(self.page(tweets, next_token))

    def page(self, tweets: list[Tweet], next_token: str | None) -> dict[str, Any]:
        data, media = [], []
        for tweet_id, items in tweets:
            keys = []
            for i, (kind, path) in enumerate(items):
                item: dict[str, Any] = {"media_key": media_key(tweet_id, i), "type": kind}
                if kind == "photo":
                    item.update(url=self.image_base + str(path), width=160, height=160)
                else:
                    item["preview_image_url"] = f"{self.image_base}/preview/{tweet_id}.jpg"
                media.append(item)
                keys.append(item["media_key"])
            data.append({"id": tweet_id, "text": f"tweet {tweet_id}", "attachments": {}})
            data[-1]["attachments"]["media_keys"] = keys
        body: dict[str, Any] = {"meta": {"result_count": len(data)}}
        if data:  # the API leaves `data` out of an empty page
            body["data"] = data
            body["includes"] = {"media": media}
        if next_token:
            body["meta"]["next_token"] = next_token
        return body


def reencoded(cls: str, seed: int) -> bytes:
    """The demo photo made smaller and re-encoded at a low quality: a near duplicate."""
    buf = io.BytesIO()
    render_demo_image(cls, seed).resize((150, 150)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def as_png(cls: str, seed: int) -> bytes:
    buf = io.BytesIO()
    render_demo_image(cls, seed).save(buf, format="PNG")
    return buf.getvalue()


class ImageHost:
    """The demo image server plus /copy/, /reenc/ and /png/ routes; records every path."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = make_image_app()

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.paths.append(request.path)
            return await handler(request)

        def route(render: Callable[[str, int], bytes], ctype: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                cls, seed = request.match_info["cls"], int(request.match_info["seed"])
                return web.Response(body=render(cls, seed), content_type=ctype)

            return handler

        app.middlewares.append(record)
        app.router.add_get(r"/copy/{cls}/{seed:\d+}.jpg", route(render_demo_jpeg, "image/jpeg"))
        app.router.add_get(r"/reenc/{cls}/{seed:\d+}.jpg", route(reencoded, "image/jpeg"))
        app.router.add_get(r"/png/{cls}/{seed:\d+}.png", route(as_png, "image/png"))
        self.runner, url = await serve_locally(app, shutdown_timeout=1.0)
        return url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def settings_for(x_base: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "x_bearer_token": TOKEN,
        "x_api_base_url": x_base,
        "fetch_allow_hosts": ["127.0.0.1"],
        "fetch_retries": 0,
        "fetch_concurrency": 4,
    }
    return Settings(**(values | overrides))


def with_servers(fake: FakeSearch, body: Callable[[str], Awaitable[None]]) -> ImageHost:
    """Run `body(x_api_base_url)` with the fake X API and the image host up."""
    host = ImageHost()

    async def main() -> None:
        image_base = await host.start()
        x_base = await fake.start(image_base)
        try:
            await asyncio.wait_for(body(x_base), 30)
        finally:
            await fake.stop()
            await host.stop()

    asyncio.run(main())
    return host


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


# Queries and hashes ---------------------------------------------------------------


def test_queries_hashtag_first_then_words_and_tags_validated() -> None:
    assert search_queries("cow") == [
        "#cow has:images -is:retweet",
        "(cow OR cows) has:images -is:retweet",
    ]
    assert search_queries("cats")[1] == "(cat OR cats) has:images -is:retweet"
    assert search_queries("sheep")[1] == "sheep has:images -is:retweet"
    assert parse_tags(" cats, dogs,cats,,") == ["cats", "dogs"]
    for bad in ("../etc", "two words", "", "#cats"):
        with pytest.raises(ConfigurationError):
            parse_tags(bad)


def test_perceptual_hash_survives_reencoding_and_separates_classes() -> None:
    smaller, png, jpeg40 = [], [], []
    for cls, seed in itertools.product(("cats", "cow", "spider"), range(4)):
        h = perceptual_hash(render_demo_image(cls, seed))
        smaller.append(hamming(h, examine_image(reencoded(cls, seed)).phash))
        png.append(hamming(h, examine_image(as_png(cls, seed)).phash))
        jpeg40.append(hamming(h, examine_image(render_demo_jpeg(cls, seed, quality=40)).phash))
    # Resized and re-encoded at quality 50: a few bits at most, within the threshold.
    assert max(smaller) <= DEFAULT_NEAR_THRESHOLD and sum(smaller) / len(smaller) <= 2
    assert max(png) <= 1 and max(jpeg40) <= 4
    by_class = {cls: perceptual_hash(render_demo_image(cls, 0)) for cls in DEMO_CLASSES}
    distances = [hamming(a, b) for a, b in itertools.combinations(by_class.values(), 2)]
    assert min(distances) > 2 * DEFAULT_NEAR_THRESHOLD
    assert 24 <= sum(distances) / len(distances) <= 40  # about half of the 64 bits


def test_examine_keeps_jpegs_reencodes_others_and_rejects_bad_bytes() -> None:
    jpeg = render_demo_jpeg("dogs", 2)
    assert examine_image(jpeg).data == jpeg
    png = examine_image(as_png("dogs", 2))
    assert png.data.startswith(b"\xff\xd8\xff") and (png.width, png.height) == (160, 160)
    assert png.sha256 != png.source_sha256
    for junk in (b"", b"not an image", jpeg[: len(jpeg) // 2], b"\xff\xd8\xff\xe0" + b"\0" * 99):
        with pytest.raises(DecodeImageError):
            examine_image(junk)
    bomb = io.BytesIO()
    Image.new("1", (8000, 6000)).save(bomb, format="PNG")  # 48 Mpx in a few kB
    with pytest.raises(DecodeImageError, match="too many pixels"):
        examine_image(bomb.getvalue())


# Collecting -----------------------------------------------------------------------


def test_collect_stops_at_n_per_class_pages_in_order_and_skips_duplicates(
    tmp_path: Path,
) -> None:
    fake = FakeSearch(
        {
            CATS_TAG: [
                [
                    ("101", [photo("/img/cats/1.jpg")]),
                    ("102", [VIDEO, photo("/copy/cats/1.jpg")]),  # same bytes, other URL
                    ("103", [photo("/status/404/gone.jpg")]),
                    ("104", [photo("/html/page.jpg")]),  # HTML served as image/jpeg
                    ("105", [photo("/corrupt/c.jpg"), GIF]),  # JPEG magic, garbage after
                ],
                [
                    ("106", [photo("/reenc/cats/1.jpg")]),  # near duplicate of 101
                    ("107", [photo("/img/cats/1.jpg")]),  # the same URL again
                    ("108", [photo("/img/cats/2.jpg")]),
                ],
            ],
            CATS_WORDS: [
                [("109", [photo("/img/cats/3.jpg")]), ("110", [photo("/img/cats/4.jpg")])],
                [("111", [photo("/img/cats/5.jpg")])],  # never needed
            ],
            DOGS_TAG: [
                [
                    ("201", [photo("/img/dogs/1.jpg")]),
                    ("202", [photo("/copy/cats/2.jpg")]),  # saved for cats already
                    ("203", [photo("/png/dogs/2.png")]),
                    ("204", [photo("/img/dogs/3.jpg")]),
                    ("205", [photo("/img/dogs/6.jpg")]),  # never needed
                ],
                [("206", [photo("/img/dogs/7.jpg")])],
            ],
        }
    )
    out = tmp_path / "noisy"
    result: dict[str, Any] = {}

    async def body(x_base: str) -> None:
        result.update(await collect(settings_for(x_base), ["cats", "dogs"], 3, out))

    host = with_servers(fake, body)

    # Hashtag pages followed by next_token, then the words; no page asked for past N.
    assert fake.requests == [(CATS_TAG, None), (CATS_TAG, "p1"), (CATS_WORDS, None)] + [
        (DOGS_TAG, None)
    ]
    for seen in fake.seen:
        assert seen["auth"] == f"Bearer {TOKEN}"
        assert seen["params"]["max_results"] == "100"
        assert {k: seen["params"][k] for k in SEARCH_PARAMS} == SEARCH_PARAMS
    # Exactly N per class, never more; photos past N were not even fetched.
    assert files_in(out / "cats") == {saved_name(t) for t in ("101", "108", "109")}
    assert files_in(out / "dogs") == {saved_name(t) for t in ("201", "203", "204")}
    assert "/img/cats/4.jpg" not in host.paths and "/img/dogs/6.jpg" not in host.paths
    assert host.paths.count("/img/cats/1.jpg") == 1
    assert not any(p.startswith("/preview/") for p in host.paths)
    # JPEGs kept byte for byte, the PNG re-encoded.
    assert (out / "cats" / saved_name("101")).read_bytes() == render_demo_jpeg("cats", 1)
    assert (out / "dogs" / saved_name("203")).read_bytes().startswith(b"\xff\xd8\xff")

    cats, dogs = result["tags"]["cats"], result["tags"]["dogs"]
    assert {k: cats[k] for k in COUNTS} == {
        "saved": 3,
        "saved_new": 3,
        "existing": 0,
        "pages": 3,
        "tweets": 10,
        "duplicates_url": 1,
        "duplicates_exact": 1,
        "duplicates_near": 1,
        "not_photo": 2,
        "fetch_failed": 2,
        "rejected": 1,
        "malformed": 0,
    }
    assert cats["complete"] and dogs["complete"]
    assert [(q["query"], q["pages"], q["stopped"]) for q in cats["queries"]] == [
        (CATS_TAG, 2, "exhausted"),
        (CATS_WORDS, 1, "full"),
    ]
    assert any("404" in e for e in cats["errors"]) and any("text/html" in e for e in cats["errors"])
    assert (dogs["saved"], dogs["duplicates_exact"], dogs["pages"]) == (3, 1, 1)
    assert [q["query"] for q in dogs["queries"]] == [DOGS_TAG]

    manifest = json.loads((out / "collect.json").read_text())
    assert manifest["tags"] == result["tags"] and len(manifest["files"]) == 6
    entry = manifest["files"][f"cats/{saved_name('109')}"]
    assert entry["tweet_id"] == "109" and entry["media_key"] == media_key("109", 0)
    assert entry["url"].endswith("/img/cats/3.jpg") and entry["query"] == CATS_WORDS
    assert manifest["files"][f"cats/{saved_name('101')}"]["query"] == CATS_TAG


COUNTS = (
    "saved",
    "saved_new",
    "existing",
    "pages",
    "tweets",
    "duplicates_url",
    "duplicates_exact",
    "duplicates_near",
    "not_photo",
    "fetch_failed",
    "rejected",
    "malformed",
)


def test_rate_limit_waits_for_the_reset_and_5xx_back_off_then_the_same_page_again(
    tmp_path: Path,
) -> None:
    fake = FakeSearch(
        {CATS_TAG: [[("101", [photo("/img/cats/1.jpg")])], [("102", [photo("/img/cats/2.jpg")])]]}
    )
    fake.inject[1] = [
        (429, {"x-rate-limit-reset": str(int(NOW + 90))}, '{"title": "Too Many Requests"}'),
        (429, {}, ""),  # no reset header: 60 s doubling
        (429, {"x-rate-limit-reset": str(int(NOW + 5000))}, ""),  # capped at 15 min
        (503, {}, "Service Unavailable"),
        (502, {}, ""),
    ]
    sleeps = Sleeps()

    async def body(x_base: str) -> None:
        manifest = await collect(
            settings_for(x_base), ["cats"], 2, tmp_path, sleep=sleeps, wall_clock=lambda: NOW
        )
        assert manifest["tags"]["cats"]["saved"] == 2

    with_servers(fake, body)
    assert sleeps.delays == [90.0, 120.0, 900.0, 5.0, 10.0]
    assert fake.requests == [(CATS_TAG, None)] + [(CATS_TAG, "p1")] * 6
    assert files_in(tmp_path / "cats") == {saved_name("101"), saved_name("102")}


def test_5xx_gives_up_after_a_few_attempts_and_keeps_what_it_saved(tmp_path: Path) -> None:
    fake = FakeSearch({CATS_TAG: [[("101", [photo("/img/cats/1.jpg")])]] * 2})
    fake.inject[1] = [(503, {}, "")] * 9
    sleeps = Sleeps()

    async def body(x_base: str) -> None:
        with pytest.raises(XApiError, match="gave up after 5 attempts; last: HTTP 503"):
            await collect(settings_for(x_base), ["cats"], 2, tmp_path, sleep=sleeps)

    with_servers(fake, body)
    assert sleeps.delays == [5.0, 10.0, 20.0, 40.0]
    manifest = json.loads((tmp_path / "collect.json").read_text())
    assert manifest["tags"]["cats"]["saved"] == 1 and not manifest["tags"]["cats"]["complete"]


def test_401_raises_without_the_token_anywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeSearch({})
    fake.inject[0] = [(401, {}, '{"title": "Unauthorized", "detail": "bad {auth}"}')]

    async def body(x_base: str) -> None:
        with pytest.raises(XApiError) as raised:
            await collect(settings_for(x_base), ["cats"], 2, tmp_path)
        message = str(raised.value)
        assert "HTTP 401" in message and "Unauthorized" in message and "bad Bearer **" in message
        assert TOKEN not in message and TOKEN not in repr(raised.value)
        assert raised.value.__cause__ is None

    with_servers(fake, body)
    assert fake.requests == [(CATS_TAG, None)]
    assert TOKEN not in caplog.text
    search = RecentSearch(base_url="http://127.0.0.1:9", bearer_token=SecretStr(TOKEN))
    assert TOKEN not in repr(search) and TOKEN not in str(vars(search))
    with pytest.raises(TypeError):
        RecentSearch(base_url="http://127.0.0.1:9", bearer_token=TOKEN)  # type: ignore[arg-type]
    assert TOKEN not in (tmp_path / "collect.json").read_text()


def test_a_resumed_run_counts_and_indexes_the_files_already_there(tmp_path: Path) -> None:
    def page(*tweets: tuple[int, str]) -> list[list[Tweet]]:
        return [[(str(tweet_id), [photo(path)]) for tweet_id, path in tweets]]

    fake = FakeSearch({CATS_TAG: page((101, "/img/cats/1.jpg"), (102, "/img/cats/2.jpg"))})
    cats = tmp_path / "cats"

    async def body(x_base: str) -> None:
        settings = settings_for(x_base)
        first = await collect(settings, ["cats"], 2, tmp_path)
        assert first["tags"]["cats"]["saved"] == 2

        # The manifest's URLs are known; the files' bytes catch the same photo elsewhere.
        fake.results[CATS_TAG] = page(
            (103, "/img/cats/1.jpg"), (104, "/copy/cats/2.jpg"), (105, "/img/cats/3.jpg")
        )
        second = await collect(settings, ["cats"], 3, tmp_path)
        report = second["tags"]["cats"]
        assert (report["existing"], report["saved"], report["saved_new"]) == (2, 3, 1)
        assert (report["duplicates_url"], report["duplicates_exact"]) == (1, 1)

        # Without the manifest, the files alone still count and still catch duplicates.
        (tmp_path / "collect.json").unlink()
        (cats / "broken.jpg").write_bytes(b"not a photo")  # not counted
        (cats / "x.jpg.part").write_bytes(b"half")  # an interrupted write: removed
        fake.results[CATS_TAG] = page((106, "/copy/cats/3.jpg"), (107, "/img/cats/4.jpg"))
        third = await collect(settings, ["cats"], 4, tmp_path)
        report = third["tags"]["cats"]
        assert (report["existing"], report["saved"], report["saved_new"]) == (3, 4, 1)
        assert report["duplicates_exact"] == 1 and report["complete"]

        # Full already: no search at all.
        before = len(fake.requests)
        fourth = await collect(settings, ["cats"], 4, tmp_path)
        assert len(fake.requests) == before
        assert fourth["tags"]["cats"]["existing"] == 4 and fourth["tags"]["cats"]["complete"]
        assert fourth["files"][f"cats/{saved_name('107')}"]["url"].endswith("/img/cats/4.jpg")

    host = with_servers(fake, body)
    assert files_in(cats) == {saved_name(str(n)) for n in (101, 102, 105, 107)} | {"broken.jpg"}
    assert host.paths.count("/img/cats/1.jpg") == 1
    assert fake.requests == [(CATS_TAG, None)] * 3


def test_collect_refuses_a_missing_token_and_bad_arguments(tmp_path: Path) -> None:
    no_token = Settings(x_bearer_token=None, x_api_base_url="http://127.0.0.1:9")
    with pytest.raises(ConfigurationError, match="TAGSTREAM_X_BEARER_TOKEN"):
        asyncio.run(collect(no_token, ["cats"], 1, tmp_path))
    with pytest.raises(ConfigurationError, match="per_class"):
        asyncio.run(collect(settings_for("http://127.0.0.1:9"), ["cats"], 0, tmp_path))
    with pytest.raises(ConfigurationError, match="max_results"):
        asyncio.run(
            collect(settings_for("http://127.0.0.1:9"), ["cats"], 1, tmp_path, max_results=5)
        )


# CLI --------------------------------------------------------------------------------


def test_cli_collect_writes_one_folder_per_tag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.helpers import BackgroundLoop

    fake = FakeSearch(
        {
            CATS_TAG: [[("101", [photo("/img/cats/1.jpg")]), ("102", [photo("/img/cats/2.jpg")])]],
            DOGS_TAG: [[("201", [photo("/img/dogs/1.jpg")])]],
        }
    )
    host = ImageHost()
    background = BackgroundLoop()
    out = tmp_path / "set"
    try:
        image_base = background.run(host.start())
        x_base = background.run(fake.start(image_base))
        env = {
            "TAGSTREAM_X_API_BASE_URL": x_base,
            "TAGSTREAM_FETCH_ALLOW_HOSTS": json.dumps(["127.0.0.1"]),
            "TAGSTREAM_FETCH_RETRIES": "0",
        }
        monkeypatch.delenv("TAGSTREAM_X_BEARER_TOKEN", raising=False)
        argv = ("collect", "--tags", "cats,dogs", "--per-class", "1", "--out", str(out))
        assert run_cli(monkeypatch, env, *argv) == 2
        assert "TAGSTREAM_X_BEARER_TOKEN is not set" in capsys.readouterr().err
        assert fake.requests == []

        env["TAGSTREAM_X_BEARER_TOKEN"] = TOKEN
        assert run_cli(monkeypatch, env, *argv, "--max-pages", "2") == 0
        captured = capsys.readouterr()
        assert "cats: 1/1" in captured.out and "dogs: 1/1" in captured.out
        assert TOKEN not in captured.out + captured.err

        fake.inject[fake.served] = [(403, {}, "forbidden for {auth}")]
        argv = ("collect", "--tags", "cow", "--per-class", "1", "--out", str(out))
        assert run_cli(monkeypatch, env, *argv) == 1
        err = capsys.readouterr().err
        assert "error:" in err and "HTTP 403" in err and TOKEN not in err
        background.run(fake.stop())
        background.run(host.stop())
    finally:
        background.close()
    assert files_in(out / "cats") == {saved_name("101")}
    assert files_in(out / "dogs") == {saved_name("201")}
    assert json.loads((out / "collect.json").read_text())["tags"]["cow"]["saved"] == 0
