"""Tests of the windowed reservoir, the sampled sink and the gallery app."""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from processors.sink import (
    GalleryClients,
    SampledSink,
    WindowedReservoir,
    safe_name,
    serve_gallery,
)
from processors.status import GalleryStatus, SinkView
from tests.helpers import MetricDeltas

XSS_TEXT = "<script>alert(1)</script> & friends"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def jpeg_bytes(color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="JPEG")
    return buf.getvalue()


def result(i: int, *, thumbnail: bytes | None = None, text: str = "") -> dict[str, Any]:
    return {
        "tweet_id": f"t{i}",
        "media_key": f"3_{i}",
        "url": f"http://img.local/{i}.jpg",
        "tweet_text": text or f"tweet number {i}",
        "hashtags": ["cat", "cute"],
        "top_class": "tabby",
        "scores": {"tabby": 0.9, "tiger": 0.05},
        "model_id": "mobilenet",
        "model_version": "3",
        "consumer_id": "c1",
        "source": "test",
        "replay_run_id": None,
        "thumbnail": thumbnail,
        "timestamps": {"ingested": 1000.0, "produced": 1250.0},
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# WindowedReservoir --------------------------------------------------------------------


def test_reservoir_is_uniform_within_a_window() -> None:
    items, k, trials, buckets = 10_000, 10, 400, 20
    rng = random.Random(1234)
    counts: Counter[int] = Counter()
    for _ in range(trials):
        reservoir = WindowedReservoir(window_s=60, per_window=k, rng=rng, clock=lambda: 0.0)
        for i in range(items):
            assert reservoir.offer(i) == []
        sample = reservoir.flush()
        assert len(sample) == k and len(set(sample)) == k
        counts.update(sample)

    # Each item's inclusion frequency should be k/items = 0.001. Per item that needs
    # millions of trials, so compare buckets of consecutive items: a positional bias
    # (first-k kept, last items favoured, off-by-one in Algorithm R) shows up there.
    size = items // buckets
    expected = trials * k * size / items  # 200 inclusions per bucket
    per_bucket = [sum(counts[i] for i in range(b * size, (b + 1) * size)) for b in range(buckets)]
    for observed in per_bucket:
        freq = observed / (trials * size)
        assert freq == pytest.approx(k / items, rel=0.25)
    chi2 = sum((o - expected) ** 2 / expected for o in per_bucket)
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    # The very first items are where naive reservoirs go wrong: no item kept every time.
    assert max(counts[i] for i in range(k)) < trials * 0.02
    assert sum(counts.values()) == trials * k


def test_reservoir_keeps_everything_in_a_small_window() -> None:
    reservoir = WindowedReservoir(
        window_s=10, per_window=5, rng=random.Random(0), clock=FakeClock()
    )
    for i in range(3):
        reservoir.offer(i)
    assert sorted(reservoir.flush()) == [0, 1, 2]
    assert reservoir.flush() == []


def test_reservoir_closes_windows_by_clock() -> None:
    clock = FakeClock(100.0)
    reservoir = WindowedReservoir(window_s=10, per_window=2, rng=random.Random(0), clock=clock)
    assert reservoir.offer("a") == []
    clock.now = 109.9
    assert reservoir.offer("b") == []
    clock.now = 110.0  # exactly at the end: the first window is over
    assert reservoir.offer("c") == [["a", "b"]]
    clock.now = 145.0  # skips empty windows [120, 130) and [130, 140)
    assert reservoir.offer("d") == [["c"]]
    assert reservoir.window_end == 150.0
    clock.now = 149.0
    assert reservoir.close_expired() == []
    clock.now = 150.0
    assert reservoir.close_expired() == [["d"]]
    clock.now = 200.0
    assert reservoir.close_expired() == []  # nothing arrived: no empty samples
    assert reservoir.flush() == []
    assert reservoir.window_end == 210.0


def test_reservoir_due_and_flush_after_the_end() -> None:
    clock = FakeClock(0.0)
    reservoir = WindowedReservoir(window_s=10, per_window=2, clock=clock)
    assert not reservoir.due()
    reservoir.offer("a")
    assert not reservoir.due()
    clock.now = 25.0
    assert reservoir.due()
    assert reservoir.flush() == ["a"]
    assert not reservoir.due()  # flushed: nothing pending, and the grid moved on
    assert reservoir.window_end == 30.0
    reservoir.offer("b")
    clock.now = 29.0
    assert reservoir.flush() == ["b"]  # flush closes a window early, too
    assert reservoir.window_end == 30.0


def test_reservoir_validates_options() -> None:
    with pytest.raises(ValueError):
        WindowedReservoir(window_s=0, per_window=1)
    with pytest.raises(ValueError):
        WindowedReservoir(window_s=1, per_window=0)


# SampledSink ----------------------------------------------------------------------------


def test_safe_name() -> None:
    assert safe_name("3_123-abc") == "3_123-abc"
    assert safe_name("a/b") != safe_name("a:b")
    for key in ("../../etc/passwd", "a/b", "", "ü" * 300, "x.jpg"):
        name = safe_name(key)
        assert name and len(name) <= 120
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


def test_sink_writes_jsonl_and_thumbs(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = SampledSink(
        out_dir=tmp_path, window_s=10, per_window=5, rng=random.Random(0), clock=clock
    )
    thumb = jpeg_bytes()
    sink.add(result(1, thumbnail=thumb))
    sink.add({**result(2), "media_key": "../../evil key"})  # no thumbnail: still a line
    assert not (tmp_path / "samples.jsonl").exists()  # the window is still open
    clock.now += 10
    sink.add(result(3, thumbnail=thumb))  # closes the first window

    lines = read_lines(tmp_path / "samples.jsonl")
    assert sorted(line["tweet_id"] for line in lines) == ["t1", "t2"]
    by_id = {line["tweet_id"]: line for line in lines}
    assert "thumbnail" not in by_id["t1"]
    assert by_id["t1"]["thumb"] == "3_1.jpg"
    assert (tmp_path / "thumbs" / "3_1.jpg").read_bytes() == thumb
    assert by_id["t2"]["thumb"] is None
    assert by_id["t1"]["hashtags"] == ["cat", "cute"]
    assert by_id["t1"]["timestamps"] == {"ingested": 1000.0, "produced": 1250.0}
    assert isinstance(by_id["t1"]["sampled_at_ms"], float)
    assert sorted(line["seq"] for line in lines) == [1, 2]
    assert list((tmp_path / "thumbs").iterdir()) == [tmp_path / "thumbs" / "3_1.jpg"]

    sink.flush()
    lines = read_lines(tmp_path / "samples.jsonl")
    assert [line["tweet_id"] for line in lines][-1] == "t3"
    assert sink.stats() == {"seen": 3, "sampled": 3, "withdrawn": 0}
    assert [s["seq"] for s in sink.samples()] == [3, 2, 1]
    assert [s["seq"] for s in sink.samples(after=1)] == [3, 2]
    assert [s["seq"] for s in sink.samples(after=0, limit=1)] == [3]


def test_sink_tick_writes_a_quiet_window(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = SampledSink(out_dir=tmp_path, window_s=5, per_window=3, clock=clock)
    sink.add(result(1))
    sink.tick()
    assert sink.last_seq == 0 and not sink.window_due()
    clock.now += 5
    assert sink.window_due()
    sink.tick()
    assert sink.last_seq == 1 and not sink.window_due()
    sink.add(result(2))
    clock.now += 5
    assert sink.window_due()
    sink.flush()
    assert sink.last_seq == 2 and not sink.window_due()


def test_sink_keeps_newest_and_reloads_after_restart(tmp_path: Path) -> None:
    sink = SampledSink(out_dir=tmp_path, window_s=10, per_window=100, keep=5, clock=FakeClock())
    for i in range(12):
        sink.add(result(i, thumbnail=jpeg_bytes()))
    sink.flush()
    kept = sink.samples()
    assert len(kept) == 5
    assert [s["seq"] for s in kept] == [12, 11, 10, 9, 8]

    # A torn last line (crash mid-write) must not stop the reload.
    with (tmp_path / "samples.jsonl").open("a") as fh:
        fh.write('{"tweet_id": "torn"')
    again = SampledSink(out_dir=tmp_path, window_s=10, per_window=100, keep=5, clock=FakeClock())
    assert [s["tweet_id"] for s in again.samples()] == [s["tweet_id"] for s in kept]
    assert again.last_seq == 12
    assert again.stats() == {"seen": 0, "sampled": 0, "withdrawn": 0}
    with (tmp_path / "samples.jsonl").open("a") as fh:
        fh.write("\n")
    again.add(result(99))
    again.flush()
    assert again.samples(after=12)[0]["tweet_id"] == "t99"
    assert again.samples(after=12)[0]["seq"] == 13  # seq continues across restarts


def withdrawal(tweet_id: str, ingested: float) -> dict[str, Any]:
    from schemas.records import retraction

    post = {"id": tweet_id, "source": "test", "ingested_at_ms": ingested}
    return dict(retraction(tweet=post, timestamps={}))


def test_a_retraction_withdraws_earlier_results_held_shown_and_still_to_come(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    sink = SampledSink(out_dir=tmp_path, window_s=10, per_window=10, clock=clock)
    sink.add(result(1, thumbnail=jpeg_bytes()))
    sink.add(result(2))
    sink.flush()  # both shown
    sink.add({**result(3), "tweet_id": "t1", "media_key": "3_1b"})  # t1's 2nd photo, held
    sink.add(result(4))
    sink.add(withdrawal("t1", ingested=1001.0))  # results were ingested at 1000
    # A photo of t1 that comes after its retraction, and t2's edit retracting t2.
    sink.add({**result(5), "tweet_id": "t1", "media_key": "3_1c"})
    sink.add(withdrawal("t2", ingested=1001.0))
    sink.add({**result(6), "tweet_id": "t2", "timestamps": {"ingested": 1001.0}})  # new version
    sink.flush()
    assert [s["tweet_id"] for s in sink.samples()] == ["t2", "t4"]
    assert sink.samples()[0]["media_key"] == "3_6"
    assert sink.stats() == {"seen": 5, "sampled": 4, "withdrawn": 4}
    # A retraction is never a sample itself, and a restart does not bring them back.
    again = SampledSink(out_dir=tmp_path, window_s=10, per_window=10, clock=FakeClock())
    assert [s["tweet_id"] for s in again.samples()] == ["t2", "t4"]
    assert (tmp_path / "thumbs" / "3_1.jpg").exists()  # files stay; the page stops asking


def test_sink_is_thread_safe(tmp_path: Path) -> None:
    sink = SampledSink(out_dir=tmp_path, window_s=0.001, per_window=2, keep=10_000)

    def feed(base: int) -> None:
        for i in range(500):
            sink.add(result(base + i))

    threads = [threading.Thread(target=feed, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.flush()
    lines = read_lines(tmp_path / "samples.jsonl")
    assert sink.stats()["seen"] == 2000
    assert len(lines) == sink.stats()["sampled"] == sink.last_seq
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))


def test_sink_drops_non_finite_scores(tmp_path: Path) -> None:
    sink = SampledSink(out_dir=tmp_path, window_s=10, per_window=2, clock=FakeClock())
    sink.add({**result(1), "scores": {"tabby": float("nan"), "tiger": float("inf")}})
    sink.flush()
    text = (tmp_path / "samples.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text


# Gallery --------------------------------------------------------------------------------


async def _with_gallery(sink: SampledSink, body: Any) -> Any:
    runner, url = await serve_gallery(sink, host="127.0.0.1", port=0)
    try:
        async with aiohttp.ClientSession() as session:
            return await body(session, url)
    finally:
        await runner.cleanup()


def _sink_with_samples(tmp_path: Path, n: int = 3) -> SampledSink:
    sink = SampledSink(out_dir=tmp_path, window_s=10, per_window=10, clock=FakeClock())
    for i in range(n):
        sink.add(result(i, thumbnail=jpeg_bytes(), text=f"{XSS_TEXT} {i}"))
    sink.flush()
    return sink


def test_serve_gallery_url_and_healthz(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path)

    async def body(session: aiohttp.ClientSession, url: str) -> None:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert int(url.rsplit(":", 1)[1].strip("/")) > 0
        async with session.get(url + "healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"

    asyncio.run(_with_gallery(sink, body))


def test_api_samples_after_filtering(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path, n=4)

    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "api/samples") as resp:
            assert resp.status == 200
            data = await resp.json()
        assert [s["seq"] for s in data["samples"]] == [4, 3, 2, 1]
        assert data["last_seq"] == 4
        assert data["stats"] == {"seen": 4, "sampled": 4, "withdrawn": 0}
        assert all("thumbnail" not in s for s in data["samples"])
        async with session.get(url + "api/samples?after=2") as resp:
            assert [s["seq"] for s in (await resp.json())["samples"]] == [4, 3]
        async with session.get(url + "api/samples?after=4") as resp:
            data = await resp.json()
            assert data["samples"] == [] and data["last_seq"] == 4
        async with session.get(url + "api/samples?after=nope") as resp:
            assert resp.status == 400

    asyncio.run(_with_gallery(sink, body))


def test_thumbs_served_and_traversal_rejected(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path / "sink", n=1)
    (tmp_path / "secret.jpg").write_bytes(b"root:x:0:0 secret")
    thumb = sink.samples()[0]["thumb"]

    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + f"thumbs/{thumb}") as resp:
            assert resp.status == 200
            assert resp.content_type == "image/jpeg"
            assert (await resp.read())[:2] == b"\xff\xd8"
        async with session.get(url + "thumbs/missing.jpg") as resp:
            assert resp.status == 404
        evil = [
            "thumbs/..%2F..%2Fetc%2Fpasswd",
            "thumbs/..%2Fsecret.jpg",
            "thumbs/..%2F..%2Fsecret.jpg",
            "thumbs/%2E%2E%2F%2E%2E%2Fsecret.jpg",
            "thumbs/..%5C..%5Csecret.jpg",
            "thumbs/%2Fetc%2Fpasswd",
            "thumbs/..",
            "thumbs/../../secret.jpg",
            "thumbs/3_0.jpg%00.png",
        ]
        for path in evil:
            async with session.get(aiohttp.client.URL(url + path, encoded=True)) as resp:
                text = await resp.text(errors="replace")
                assert resp.status in (400, 403, 404), path
                assert "root:" not in text and "secret" not in text, path

    asyncio.run(_with_gallery(sink, body))


def test_page_has_no_server_rendered_text(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path)

    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            csp = resp.headers["Content-Security-Policy"]
            page = await resp.text()
        assert "script-src 'self'" in csp
        assert "friends" not in page and "tweet number" not in page and "#cat" not in page
        assert "waiting for results" in page
        for asset in ("static/gallery.js", "static/gallery.css"):
            assert asset in page
            async with session.get(url + asset) as resp:
                assert resp.status == 200
        async with session.get(url + "static/gallery.js") as resp:
            script = await resp.text()
        # Untrusted strings must only ever reach the DOM as text.
        for sink_api in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink_api not in script, sink_api
        assert "textContent" in script
        async with session.get(url + "api/samples") as resp:
            texts = [s["tweet_text"] for s in (await resp.json())["samples"]]
        assert texts[0].startswith(XSS_TEXT)

    asyncio.run(_with_gallery(sink, body))


# Metrics and the status strip ------------------------------------------------------------


def test_the_sink_counts_what_it_sees_samples_and_withdraws(tmp_path: Path) -> None:
    moved = MetricDeltas()
    sink = SampledSink(out_dir=tmp_path, window_s=10, per_window=2, clock=FakeClock())
    for i in range(5):
        sink.add(result(i))
    sink.flush()
    retraction = {**result(0), "retraction": True, "timestamps": {"ingested": 2000.0}}
    sink.add(retraction)  # withdraws the sample of t0, if it was sampled
    sink.add(result(0))  # ingested before the retraction: not taken
    assert moved.delta("tagstream_sink_results_seen_total") == 5
    assert moved.delta("tagstream_sink_results_sampled_total") == 2
    assert moved.delta("tagstream_sink_results_withdrawn_total") == sink.stats()["withdrawn"] >= 1


def test_the_gallery_serves_metrics_and_counts_the_pages_polling_it(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path)

    async def body(session: aiohttp.ClientSession, url: str) -> str:
        for query in ("?client=page-a", "?client=page-b", "?client=page-a", "", "?client=<x>"):
            async with session.get(url + "api/samples" + query) as resp:
                assert resp.status == 200
        async with session.get(url + "metrics") as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            return await resp.text()

    text = asyncio.run(_with_gallery(sink, body))
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    # Two pages with ids; the requests without a usable id share their address.
    assert values["tagstream_sink_gallery_clients"] == 3
    assert values["tagstream_sink_results_seen_total"] >= 3


def test_gallery_clients_are_those_that_polled_lately() -> None:
    clock = FakeClock()
    clients = GalleryClients(active_s=10.0, keep=3, clock=clock)
    for name in ("a", "b", "c"):
        clients.seen(name)
    clock.now += 6
    clients.seen("a")
    clients.seen("d")  # only 3 kept: b, the least recent, is forgotten
    assert clients.count() == 3
    clock.now += 6  # c, seen 12 s ago, is gone; a and d polled 6 s ago
    assert clients.count() == 2


def test_the_status_strip_from_the_sinks_own_view() -> None:
    clock = FakeClock()
    view = SinkView(window_s=60.0, clock=clock)
    empty = view.status()
    assert empty["results_per_s"] == 0 and empty["latency_p50_s"] is None
    clock.now += 10
    for ms in range(100, 1100, 10):  # 100 results, 0.1 s to 1.09 s from ingestion
        view.result({"timestamps": {"ingested": 0.0, "produced": float(ms)}})
    view.set_lag("t-tagstream-sink", 4)
    status = view.status()
    assert status["source"] == "sink"
    assert status["results_per_s"] == pytest.approx(100 / 10)
    assert status["latency_p50_s"] == pytest.approx(0.59)
    assert status["latency_p99_s"] == pytest.approx(1.08)
    assert status["lag"] == {"t-tagstream-sink": 4}
    # What the sink cannot see without Prometheus is unknown, not zero.
    assert status["tweets_in_per_s"] is None and status["shed_fraction"] is None
    clock.now += 61  # the window has passed
    assert view.status()["results_per_s"] == 0 and view.status()["latency_p99_s"] is None


def test_the_status_strip_says_so_when_prometheus_does_not_answer(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    status = GalleryStatus(sink.view, prometheus_url=f"http://127.0.0.1:{port}").status()
    assert status["source"] == "sink" and "did not answer" in status["note"]
    assert status["results_per_s"] > 0


def test_api_status_serves_the_strip(tmp_path: Path) -> None:
    sink = _sink_with_samples(tmp_path, n=4)

    async def body(session: aiohttp.ClientSession, url: str) -> dict:
        async with session.get(url + "api/status") as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
            return await resp.json()

    status = asyncio.run(_with_gallery(sink, body))
    assert status["source"] == "sink" and status["latency_p50_s"] == pytest.approx(0.25)
    assert status["results_per_s"] > 0 and status["lag"] == {}
