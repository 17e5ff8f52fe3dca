"""The image fetcher against real local servers: the demo image host and small custom apps."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from PIL import Image

from infra.demo_images import render_demo_jpeg
from infra.exceptions import RejectedFetchError, TransientFetchError
from infra.fetcher import FetchedImage, ImageFetcher, sniff_image_type
from infra.image_server import HUGE_BYTES_SENT, start_image_server, truth_from_url
from tests.helpers import MetricDeltas, Sleeps


def fetcher(**overrides: Any) -> ImageFetcher:
    options: dict[str, Any] = {
        "concurrency": 8,
        "per_host": 4,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.3,
        "max_bytes": 1_000_000,
        "retries": 2,
        "allow_hosts": ["127.0.0.1"],
        "sleep": Sleeps(),
    }
    options.update(overrides)
    return ImageFetcher(**options)


def with_server(body: Callable[[web.AppRunner, str], Awaitable[None]]) -> None:
    async def main() -> None:
        runner, base = await start_image_server()
        try:
            await body(runner, base)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_good_jpeg_is_fetched_and_sniffed() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher() as f:
            got = await f.fetch(f"{base}/img/cats/7.jpg")
        assert isinstance(got, FetchedImage)
        assert got.content_type == "image/jpeg"
        assert got.data == render_demo_jpeg("cats", 7)
        assert got.attempts == 1 and got.final_url == got.url == f"{base}/img/cats/7.jpg"
        assert got.elapsed_ms > 0

    with_server(body)


def test_tweet_size_photos_are_served() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher(max_bytes=2_000_000) as f:
            got = await f.fetch(f"{base}/photo/dogs/3.jpg")
        assert isinstance(got, FetchedImage)
        assert Image.open(io.BytesIO(got.data)).size == (1200, 900)
        assert truth_from_url(got.url) == "dogs"

    with_server(body)


def test_404_is_rejected_without_retry() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        sleeps = Sleeps()
        async with fetcher(sleep=sleeps) as f:
            with pytest.raises(RejectedFetchError, match="HTTP 404") as info:
                await f.fetch(f"{base}/status/404/gone.jpg")
        assert f"{base}/status/404/gone.jpg" in str(info.value)
        assert info.value.attempts == 1  # type: ignore[attr-defined]
        assert sleeps.delays == []

    with_server(body)


@pytest.mark.parametrize("code", [503, 429])
def test_transient_status_is_retried_with_backoff(code: int) -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        sleeps = Sleeps()
        async with fetcher(sleep=sleeps, retries=2, backoff_base_s=0.2) as f:
            with pytest.raises(TransientFetchError, match=f"HTTP {code}.*3 attempts") as info:
                await f.fetch(f"{base}/status/{code}/busy")
        assert info.value.attempts == 3  # type: ignore[attr-defined]
        assert len(sleeps.delays) == 2
        assert 0.1 <= sleeps.delays[0] <= 0.2 and 0.2 <= sleeps.delays[1] <= 0.4

    with_server(body)


def test_slow_body_times_out_quickly() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher(retries=0, read_timeout_s=0.3) as f:
            started = time.perf_counter()
            with pytest.raises(TransientFetchError, match="timed out reading"):
                await f.fetch(f"{base}/slow/dogs/1.jpg?delay=10")
            assert time.perf_counter() - started < 2.0

    with_server(body)


def test_html_claiming_to_be_jpeg_is_rejected() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher() as f:
            with pytest.raises(RejectedFetchError, match="not an image: looks like text/html"):
                await f.fetch(f"{base}/html/cat.jpg")

    with_server(body)


def test_huge_body_is_cut_off_at_the_cap() -> None:
    async def body(runner: web.AppRunner, base: str) -> None:
        async with fetcher(max_bytes=200_000) as f:
            started = time.perf_counter()
            with pytest.raises(RejectedFetchError, match="too large.*200000-byte cap"):
                await f.fetch(f"{base}/huge/big.jpg?mb=500")
            assert time.perf_counter() - started < 3.0
        await asyncio.sleep(0.05)
        # Socket buffers let the server get ahead a little, not by hundreds of MB.
        assert runner.app[HUGE_BYTES_SENT].value < 50_000_000

    with_server(body)


def test_too_large_content_length_is_rejected_before_reading() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher(max_bytes=1024) as f:
            with pytest.raises(RejectedFetchError, match="Content-Length .* exceeds 1024"):
                await f.fetch(f"{base}/img/cow/1.jpg")

    with_server(body)


def test_corrupt_jpeg_passes_sniffing() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher() as f:
            got = await f.fetch(f"{base}/corrupt/x.jpg")
        assert got.content_type == "image/jpeg"

    with_server(body)


def test_redirects_are_followed_and_checked() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        port = base.rsplit(":", 1)[1]
        async with fetcher() as f:
            target = f"{base}/img/dogs/5.jpg"
            got = await f.fetch(f"{base}/redirect?to={quote(target)}")
            assert got.final_url == target and got.data == render_demo_jpeg("dogs", 5)

            with pytest.raises(RejectedFetchError, match="blocked address 10.0.0.1"):
                await f.fetch(f"{base}/redirect?to={quote('http://10.0.0.1/x.jpg')}")
            # A name, not an IP literal: refused by the resolver, not reached.
            with pytest.raises(RejectedFetchError, match="blocked address .*localhost"):
                await f.fetch(
                    f"{base}/redirect?to={quote(f'http://localhost:{port}/img/cats/1.jpg')}"
                )

            url = target
            for _ in range(4):
                url = f"{base}/redirect?to={quote(url, safe='')}"
            with pytest.raises(RejectedFetchError, match="more than 3 redirects"):
                await f.fetch(url)

    with_server(body)


def test_loopback_is_blocked_unless_allow_listed() -> None:
    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher(allow_hosts=()) as f:
            with pytest.raises(RejectedFetchError, match="blocked address 127.0.0.1 .loopback."):
                await f.fetch(f"{base}/img/cats/1.jpg")

    with_server(body)


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("http://169.254.169.254/latest/meta-data/", "blocked address 169.254.169.254 .link-local"),
        ("http://10.0.0.1/a.jpg", "blocked address 10.0.0.1 .private"),
        ("http://[::1]:8080/a.jpg", "blocked address ::1 .loopback"),
        ("http://0.0.0.0/a.jpg", "blocked address 0.0.0.0 .unspecified"),
        ("http://[::ffff:192.168.1.1]/a.jpg", "blocked address"),
        ("ftp://example.com/a.jpg", "scheme 'ftp' refused"),
        ("file:///etc/passwd", "scheme 'file' refused"),
    ],
)
def test_unsafe_urls_are_refused_without_connecting(url: str, pattern: str) -> None:
    async def main() -> None:
        async with fetcher(retries=3) as f:
            with pytest.raises(RejectedFetchError, match=pattern) as info:
                await f.fetch(url)
        assert url in str(info.value)

    asyncio.run(main())


def test_each_failure_has_its_cause_and_the_metrics_count_them() -> None:
    cases = {
        "/status/404/gone.jpg": (RejectedFetchError, "http_4xx"),
        "/status/503/busy": (TransientFetchError, "http_5xx"),
        "/status/429/later": (TransientFetchError, "http_429"),
        "/slow/dogs/1.jpg?delay=10": (TransientFetchError, "timeout"),
        "/html/cat.jpg": (RejectedFetchError, "not_image"),
        "/huge/big.jpg?mb=50": (RejectedFetchError, "too_large"),
    }

    async def body(_runner: web.AppRunner, base: str) -> None:
        async with fetcher(retries=1, max_bytes=200_000) as f:
            got = await f.fetch(f"{base}/img/cats/7.jpg")
            assert len(got.data) > 0
            for path, (kind, cause) in cases.items():
                with pytest.raises(kind) as info:
                    await f.fetch(base + path)
                assert info.value.cause == cause, (path, info.value)
            for url, cause in [
                ("ftp://example.com/a.jpg", "scheme"),
                ("http://10.0.0.1/a.jpg", "blocked"),
                (f"{base}/redirect?to={quote('http://10.0.0.1/x.jpg')}", "blocked"),
            ]:
                with pytest.raises(RejectedFetchError) as info:
                    await f.fetch(url)
                assert info.value.cause == cause, (url, info.value)

    moved = MetricDeltas()
    with_server(body)
    for kind, cause in cases.values():
        assert moved.delta("tagstream_fetch_failures_total", cause=cause) == 1, cause
        if kind is TransientFetchError:  # retried once, then given up on
            assert moved.delta("tagstream_fetch_retries_total", cause=cause) == 1, cause
    assert moved.delta("tagstream_fetch_failures_total", cause="scheme") == 1
    assert moved.delta("tagstream_fetch_failures_total", cause="blocked") == 2
    # The one photo fetched: its latency and its bytes.
    assert moved.delta("tagstream_fetch_seconds_count") == 1
    assert moved.delta("tagstream_fetch_bytes_total") == len(render_demo_jpeg("cats", 7))


def test_concurrency_is_bounded_overall_and_per_host() -> None:
    in_flight: dict[str, int] = {}
    peaks: dict[str, int] = {}
    jpeg = render_demo_jpeg("hen", 1)

    async def handler(request: web.Request) -> web.Response:
        host = request.host.rsplit(":", 1)[0]
        in_flight[host] = in_flight.get(host, 0) + 1
        in_flight["all"] = in_flight.get("all", 0) + 1
        for key in (host, "all"):
            peaks[key] = max(peaks.get(key, 0), in_flight[key])
        await asyncio.sleep(0.05)
        in_flight[host] -= 1
        in_flight["all"] -= 1
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{n}.jpg", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            f = fetcher(concurrency=3, per_host=2, allow_hosts=["127.0.0.1", "localhost"])
            async with f:
                urls = [
                    f"http://{host}:{port}/{n}.jpg"
                    for n in range(8)
                    for host in ("127.0.0.1", "localhost")
                ]
                got = await asyncio.gather(*(f.fetch(u) for u in urls))
        finally:
            await runner.cleanup()
        assert all(g.data == jpeg for g in got)
        assert peaks["all"] == 3
        assert peaks["127.0.0.1"] <= 2 and peaks["localhost"] <= 2

    asyncio.run(main())


def test_sniffing_recognises_the_raster_formats() -> None:
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt, mime in (
        ("PNG", "image/png"),
        ("GIF", "image/gif"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("JPEG", "image/jpeg"),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        assert sniff_image_type(buf.getvalue()) == mime
    assert sniff_image_type(b"<html></html>") is None
    assert sniff_image_type(b"BMW is a car brand, not a bitmap at all") is None
    assert sniff_image_type(b"") is None
