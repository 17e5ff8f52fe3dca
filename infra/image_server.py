"""The demo image host: serves the synthetic tweets' photos, and faults on purpose.

`producers.synthetic` writes photo URLs that point here. ``/img/`` answers a demo JPEG of
a known class (so the class is the ground truth, see `truth_from_url`), ``/photo/`` the
same class as a photo the size tweets carry (1200x900, about 160 KB); the other routes
misbehave the ways real image hosts do, to exercise the fetcher's defences in tests and
demos: slow bodies, error statuses, HTML served as a JPEG, endless bodies, corrupt JPEGs
and redirects.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from infra.demo_images import DEMO_CLASSES, render_demo_jpeg, render_demo_photo_jpeg

log = logging.getLogger(__name__)


@dataclass
class ByteCounter:
    """A running byte count (a mutable holder: a started app's state may not be reassigned)."""

    value: int = 0


#: Bytes the /huge route has written so far (all requests): tests check the fetcher hung up.
HUGE_BYTES_SENT = web.AppKey("huge_bytes_sent", ByteCounter)

# JPEG start-of-image plus a JFIF APP0 segment: enough for any magic-byte sniffer.
_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_CHUNK = 64 * 1024
_MAX_DELAY_S = 600.0
_TRUTH_PATH = re.compile(r"^/(?:img|slow|photo)/([^/]+)/(-?\d+)\.jpg$")


@lru_cache(maxsize=4096)
def _jpeg(cls: str, seed: int) -> bytes:
    # Demo traffic repeats seeds; caching keeps the host cheap beside the pipeline it feeds.
    return render_demo_jpeg(cls, seed)


def _class_and_seed(request: web.Request) -> tuple[str, int]:
    cls = request.match_info["cls"]
    if cls not in DEMO_CLASSES:
        raise web.HTTPNotFound(text=f"unknown class {cls!r}; known: {', '.join(DEMO_CLASSES)}")
    return cls, int(request.match_info["seed"])


def _float_query(request: web.Request, name: str, default: float, *, hi: float) -> float:
    raw = request.query.get(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}={raw!r} is not a number") from None
    if not 0 <= value <= hi:
        raise web.HTTPBadRequest(text=f"{name} must be in 0..{hi}, got {value}")
    return value


async def _img(request: web.Request) -> web.Response:
    cls, seed = _class_and_seed(request)
    return web.Response(body=_jpeg(cls, seed), content_type="image/jpeg")


@lru_cache(maxsize=512)
def _photo_jpeg(cls: str, seed: int) -> bytes:
    return render_demo_photo_jpeg(cls, seed)


async def _photo(request: web.Request) -> web.Response:
    cls, seed = _class_and_seed(request)
    return web.Response(body=_photo_jpeg(cls, seed), content_type="image/jpeg")


async def _slow(request: web.Request) -> web.StreamResponse:
    cls, seed = _class_and_seed(request)
    delay = _float_query(request, "delay", 30.0, hi=_MAX_DELAY_S)
    body = _jpeg(cls, seed)
    # Headers go out at once and the body stalls: that is the read timeout's case, which a
    # server slow to answer at all would not test.
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    resp.content_length = len(body)
    await resp.prepare(request)
    await asyncio.sleep(delay)
    await resp.write(body)
    await resp.write_eof()
    return resp


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text=f"status {code} is not served; use 200..599")
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code} for {request.match_info['name']}\n")


async def _html(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    page = f"<!doctype html><html><head><title>{name}</title></head><body>not a photo</body></html>"
    # The lie in the Content-Type header is the point: only sniffing the bytes catches it.
    ctype = request.query.get("type", "image/jpeg")
    return web.Response(body=page.encode(), headers={"Content-Type": ctype})


async def _huge(request: web.Request) -> web.StreamResponse:
    mb = _float_query(request, "mb", 100.0, hi=100_000.0)
    total = int(mb * 1_000_000)
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    resp.enable_chunked_encoding()  # no Content-Length: the fetcher must count bytes itself
    await resp.prepare(request)
    await resp.write(_JPEG_HEAD)
    chunk = b"\x00" * _CHUNK
    sent = 0
    try:
        while sent < total:
            piece = chunk if total - sent >= _CHUNK else chunk[: total - sent]
            await resp.write(piece)
            sent += len(piece)
            request.app[HUGE_BYTES_SENT].value += len(piece)
    except (ConnectionResetError, ConnectionError):
        return resp  # the client hung up, as a careful one should
    await resp.write_eof()
    return resp


async def _corrupt(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    garbage = rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    return web.Response(body=_JPEG_HEAD + garbage, content_type="image/jpeg")


async def _redirect(request: web.Request) -> web.Response:
    target = request.query.get("to")
    if not target:
        raise web.HTTPBadRequest(text="redirect needs ?to=URL")
    raise web.HTTPFound(location=target)


def make_image_app() -> web.Application:
    """The demo image host as an aiohttp application."""
    app = web.Application()
    app[HUGE_BYTES_SENT] = ByteCounter()
    app.router.add_get(r"/img/{cls}/{seed:-?\d+}.jpg", _img)
    app.router.add_get(r"/photo/{cls}/{seed:-?\d+}.jpg", _photo)
    app.router.add_get(r"/slow/{cls}/{seed:-?\d+}.jpg", _slow)
    app.router.add_get(r"/status/{code:\d{3}}/{name}", _status)
    app.router.add_get(r"/html/{name}.jpg", _html)
    app.router.add_get(r"/huge/{name}.jpg", _huge)
    app.router.add_get(r"/corrupt/{name}.jpg", _corrupt)
    app.router.add_get("/redirect", _redirect)
    return app


def _runner(app: web.Application) -> web.AppRunner:
    # Cancel handlers whose client left, and do not wait long for them on shutdown: the
    # slow and huge routes would otherwise keep a stopping server busy for their full length.
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)


async def start_image_server(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Start the host in the running loop; returns the runner (``await runner.cleanup()``
    stops it) and its base URL, e.g. ``http://127.0.0.1:40123``. Port 0 picks a free port."""
    runner = _runner(make_image_app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound_port}"


def run_image_server(host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve until interrupted (the ``tagstream`` CLI's image server)."""

    async def serve() -> None:
        runner, base_url = await start_image_server(host, port)
        log.info("demo image server at %s (try %s/img/cats/1.jpg)", base_url, base_url)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


def truth_from_url(url: str) -> str | None:
    """The class a demo photo URL shows (``/img/``, ``/photo/`` and ``/slow/``), else None."""
    match = _TRUTH_PATH.match(urlsplit(url).path)
    if match is None or match.group(1) not in DEMO_CLASSES:
        return None
    return match.group(1)
