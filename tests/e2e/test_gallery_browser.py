"""The gallery in a real (headless) Chromium: cards render, tweet text stays text, and the
status strip shows the run's figures.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import asyncio
import html
import io
import random
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processors.sink import SampledSink, serve_gallery

CHROMIUM = Path("/usr/bin/chromium")
XSS_TEXT = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser test needs /usr/bin/chromium (apt-get install -y chromium)",
)


def _jpeg(color: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (160, 120), color)
    # A diagonal band so the screenshot shows real pixels rather than a flat box.
    for x in range(160):
        for y in range(max(0, x - 70), min(120, x - 30)):
            image.putpixel((x, y), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _result(i: int, *, text: str, thumbnail: bytes | None) -> dict[str, Any]:
    return {
        "tweet_id": f"17{i:05d}",
        "media_key": f"3_17{i:05d}",
        "url": f"http://img.local/{i}.jpg",
        "tweet_text": text,
        "hashtags": [["xsscat"], ["caturday", "nap"], ["cat"], ["keyboardcat", "work"], ["lens"]][
            i
        ],
        "top_class": "tabby cat",
        "scores": {"tabby cat": 0.87 - i * 0.05, "tiger cat": 0.1},
        "model_id": "mobilenet_v3_small",
        "model_version": "1",
        "consumer_id": "c1",
        "source": "test",
        "replay_run_id": None,
        "thumbnail": thumbnail,
        "timestamps": {"ingested": 1_000.0, "produced": 1_000.0 + 180 + 40 * i},
    }


def _make_sink(out_dir: Path) -> SampledSink:
    sink = SampledSink(out_dir=out_dir, window_s=60, per_window=20, rng=random.Random(0))
    colors = [(52, 120, 200), (210, 90, 60), (60, 160, 110), (150, 90, 190), (230, 180, 50)]
    others = [
        "Sunday nap champion 😺 #caturday",
        "",
        "Found this one sleeping on the keyboard again. Deadline tomorrow, obviously.",
        "new lens, who dis",
    ]
    for i, text in enumerate(others, start=1):
        sink.add(_result(i, text=text, thumbnail=_jpeg(colors[i]) if i != 2 else None))
    # Added last so it is the newest card, first in the grid.
    sink.add(_result(0, text=XSS_TEXT, thumbnail=_jpeg(colors[0])))
    sink.flush()
    sink.view.set_lag("tagstream-sink", 3)  # as its consumer thread reports it
    return sink


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


async def _browse(sink: SampledSink, tmp_path: Path) -> tuple[str, Path, str]:
    runner, url = await serve_gallery(sink, host="127.0.0.1", port=0)
    try:
        # Chromium blocks; run it in a thread so this loop keeps serving its requests.
        dom = await asyncio.to_thread(_chromium, tmp_path / "profile-dom", "--dump-dom", url)
        shot = tmp_path / "gallery.png"
        snap = await asyncio.to_thread(
            _chromium,
            tmp_path / "profile-shot",
            f"--screenshot={shot}",
            "--window-size=1280,900",
            "--hide-scrollbars",
            url,
        )
    finally:
        await runner.cleanup()
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert snap.returncode == 0, snap.stderr[-2000:]
    return dom.stdout, shot, snap.stderr


def test_gallery_renders_cards_and_escapes_tweet_text(tmp_path: Path) -> None:
    sink = _make_sink(tmp_path / "sink")
    dom, shot, _ = asyncio.run(_browse(sink, tmp_path))

    # The page fetched /api/samples and built the cards client-side.
    grid = dom.split('id="grid"', 1)[1].split("<template", 1)[0]
    assert grid.count('<article class="card') == 5, dom[-3000:]
    first = grid.split("</article>", 1)[0]  # the newest card: the hostile one
    assert '<li class="tag">#xsscat</li>' in first
    assert "tabby cat · 87.0%" in first
    assert "mobilenet_v3_small v1" in first
    assert "e2e 180 ms" in first
    assert 'src="thumbs/3_1700000.jpg"' in first
    assert 'hidden=""' in dom.split('id="empty"', 1)[1].split(">", 1)[0]

    # The hostile tweet text is in the DOM as text (escaped when serialized), not markup.
    assert f'<p class="text">{html.escape(XSS_TEXT, quote=False)}</p>' in first
    assert "<script>document.title" not in dom
    assert '<img src="x"' not in dom and "<img src=x" not in dom

    # The status strip: the figures of the sink's own view (no Prometheus here), rendered
    # by the page from /api/status; what only Prometheus knows is a dash, not a zero.
    def strip(name: str) -> str:
        return re.search(rf'id="status-{name}"[^>]*>([^<]*)<', dom).group(1)  # type: ignore[union-attr]

    assert re.fullmatch(r"\d+(\.\d)?/s", strip("out")), strip("out")
    assert strip("p50") == "260 ms" and strip("p99") == "340 ms"
    assert strip("lag") == "tagstream-sink 3"
    assert strip("in") == strip("shed") == strip("dead") == "–"
    assert strip("source") == "from the sink's own view"
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title == "tagstream gallery"
    assert "pwned" not in title

    # A real screenshot: a PNG of the requested size with more than a blank page in it.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000
    with Image.open(shot) as image:
        colors = image.convert("RGB").resize((64, 45)).getcolors(maxcolors=64 * 45)
    assert colors is not None and len(colors) > 20
