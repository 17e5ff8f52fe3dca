"""The sampled sink and the live gallery of HashtagResult records.

A busy stream yields far more results than anyone can look at, so the sink keeps a
uniform random sample of each time window (reservoir sampling, Algorithm R): every
result of a window has the same chance to be shown, however bursty the window was.
Closed windows are appended to ``<out_dir>/samples.jsonl`` with their thumbnails in
``<out_dir>/thumbs/``, and the newest samples are held in memory for the gallery, a
small aiohttp app whose page polls ``/api/samples`` and renders cards client-side.

A retraction (a HashtagResult with ``retraction`` set: the post was deleted or edited)
withdraws the post's results ingested before it: they leave the window being sampled and
the gallery's memory, and those that arrive later (results can come after their
retraction) are not taken. Samples already written stay in ``samples.jsonl``, followed by
a ``{"retracted": [seq, ...]}`` line, so a restarted sink does not show them again. A
page already open keeps the cards it has drawn until it is reloaded.

Nothing here knows about Kafka: the caller's consumer thread calls `SampledSink.add`
for every decoded result while the gallery is served from an asyncio loop, so the sink
guards its state with a lock.

The gallery also serves ``/metrics`` (every metric of the process: infra/metrics.py; the
sink counts results seen, sampled and withdrawn, and the pages polling it), and
``/api/status``, the figures of the page's status strip (processors/status.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from infra import metrics
from processors.status import GalleryStatus, SinkView
from schemas.records import retracts

__all__ = [
    "GalleryClients",
    "SampledSink",
    "WindowedReservoir",
    "make_gallery_app",
    "safe_name",
    "serve_gallery",
]

STATIC_DIR = Path(__file__).resolve().parent / "static"
SAMPLES_FILE = "samples.jsonl"
THUMBS_DIR = "thumbs"

# Retractions remembered, to drop the results that arrive after theirs.
_RETRACTIONS_KEPT = 10_000

# Thumbnail names we ever write, and therefore the only ones we ever serve.
_THUMB_NAME = re.compile(r"[A-Za-z0-9_-]{1,160}\.jpg")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Bytes read back from the end of samples.jsonl per sample on restart; thumbnails are
# not in the file, so lines are small and this bounds the read for huge files.
_TAIL_BYTES_PER_LINE = 4096

# The page renders every untrusted string with textContent; the policy is a second
# line of defence that also stops inline scripts if a future change slips.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class WindowedReservoir:
    """A uniform sample of at most `per_window` items from each window of `window_s` seconds.

    Windows are aligned on a grid that starts when the reservoir is made. A window
    closes when an item arrives at or after its end (`offer`), when `close_expired`
    sees that its end has passed, or on `flush`; `due` tells a caller polling a quiet
    stream that it is time to do so. Windows in which nothing arrived produce no sample.
    """

    def __init__(
        self,
        *,
        window_s: float,
        per_window: int,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        if per_window < 1:
            raise ValueError("per_window must be at least 1")
        self.window_s = float(window_s)
        self.per_window = per_window
        self._rng = rng or random.Random()
        self._clock = clock
        self._origin = clock()
        self._end = self._origin + self.window_s
        self._seen = 0
        self._sample: list[Any] = []

    @property
    def window_end(self) -> float:
        """Clock time at which the current window ends."""
        return self._end

    @property
    def seen_in_window(self) -> int:
        return self._seen

    def discard(self, unwanted: Callable[[Any], bool]) -> int:
        """Take the items `unwanted` says out of the current sample; returns how many.

        The window's count of items seen stays: its other items keep their chance."""
        kept = [item for item in self._sample if not unwanted(item)]
        dropped = len(self._sample) - len(kept)
        self._sample = kept
        return dropped

    def offer(self, item: Any) -> list[list[Any]]:
        """Consider `item` for the current window; return the samples of windows it closed."""
        closed = self.close_expired()
        self._seen += 1
        if len(self._sample) < self.per_window:
            self._sample.append(item)
        else:
            # Algorithm R: the n-th item replaces a random slot with probability k/n.
            j = self._rng.randrange(self._seen)
            if j < self.per_window:
                self._sample[j] = item
        return closed

    def due(self) -> bool:
        """Whether the current window holds items and its end has passed."""
        return self._seen > 0 and self._clock() >= self._end

    def close_expired(self) -> list[list[Any]]:
        """Close the current window if its end has passed; return its sample, if any."""
        now = self._clock()
        if now < self._end:
            return []
        closed = [self._take()] if self._seen else []
        self._reset()
        self._advance(now)
        return closed

    def flush(self) -> list[Any]:
        """Close the current window now and return its sample (empty if nothing arrived)."""
        sample = self._take()
        self._reset()
        self._advance(self._clock())
        return sample

    def _advance(self, now: float) -> None:
        # Skip whole windows that have passed so that the current window contains `now`.
        if now >= self._end:
            self._end += self.window_s * (math.floor((now - self._end) / self.window_s) + 1)

    def _take(self) -> list[Any]:
        sample = self._sample
        self._sample = []
        return sample

    def _reset(self) -> None:
        self._seen = 0
        self._sample = []


def safe_name(media_key: str) -> str:
    """A file-name stem for `media_key` made only of ``[A-Za-z0-9_-]``.

    Keys that had to be changed (or cut short) get a hash suffix so that two keys that
    sanitize alike, such as ``a/b`` and ``a:b``, do not overwrite each other's thumbnail.
    """
    cleaned = _UNSAFE.sub("_", media_key)[:100]
    if cleaned == media_key and cleaned:
        return cleaned
    digest = hashlib.sha1(media_key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned}-{digest}" if cleaned else f"media-{digest}"


def _json_safe(value: Any) -> Any:
    """`value` with NaN/inf replaced by None: browsers' JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return None
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    # Write-then-rename so the gallery never serves a half-written thumbnail.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class SampledSink:
    """Samples HashtagResult dicts per window, persists them and keeps the newest in memory.

    Each closed window's samples become lines of ``samples.jsonl`` (the result without
    its thumbnail bytes, plus ``thumb``, ``sampled_at_ms`` and ``seq``) and JPEG files
    in ``thumbs/``. ``seq`` increases by one per sample and continues across restarts,
    so a browser polling with ``after=`` keeps working when the sink restarts.
    `add` and `flush` may be called from any thread.
    """

    def __init__(
        self,
        *,
        out_dir: Path,
        window_s: float,
        per_window: int,
        keep: int = 200,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        metrics.expose(metrics.SINK)
        self.out_dir = Path(out_dir)
        self.thumbs_dir = self.out_dir / THUMBS_DIR
        self.samples_path = self.out_dir / SAMPLES_FILE
        self.thumbs_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()
        self._reservoir = WindowedReservoir(
            window_s=window_s, per_window=per_window, rng=rng, clock=clock
        )
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._retractions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._seq = 0
        self._seen = 0
        self._sampled = 0
        self._withdrawn = 0
        #: The results it read, for the status strip when no Prometheus is configured.
        self.view = SinkView()
        self._load_tail()

    # Ingest ---------------------------------------------------------------------

    def add(self, result: dict[str, Any]) -> None:
        """Offer one HashtagResult; writes the samples of any window this closes. A
        retraction withdraws the results it names instead (module docstring)."""
        with self._lock:
            if result.get("retraction"):
                self._retract(result)
                return
            withdrawal = self._retractions.get(result.get("tweet_id") or "")
            if withdrawal is not None and retracts(withdrawal, result):
                self._withdrawn += 1
                metrics.SINK_WITHDRAWN.inc()
                return
            self._seen += 1
            metrics.SINK_SEEN.inc()
            self.view.result(result)
            for sample in self._reservoir.offer(result):
                self._write_window(sample)

    def _retract(self, withdrawal: dict[str, Any]) -> None:
        tweet_id = withdrawal.get("tweet_id") or ""
        known = self._retractions.get(tweet_id)
        if known is None or retracts(withdrawal, {**known, "retraction": False}):
            # The later retraction withdraws all that the earlier one did, and more.
            self._retractions[tweet_id] = withdrawal
        self._retractions.move_to_end(tweet_id)
        if len(self._retractions) > _RETRACTIONS_KEPT:
            self._retractions.popitem(last=False)
        discarded = self._reservoir.discard(lambda r: retracts(withdrawal, r))
        self._withdrawn += discarded
        metrics.SINK_WITHDRAWN.inc(discarded)
        gone = [r["seq"] for r in self._recent if retracts(withdrawal, r)]
        if gone:
            self._recent = deque(
                (r for r in self._recent if r["seq"] not in gone), maxlen=self.keep
            )
            self._withdrawn += len(gone)
            metrics.SINK_WITHDRAWN.inc(len(gone))
            with self.samples_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"retracted": gone, "tweet_id": tweet_id}) + "\n")

    def window_due(self) -> bool:
        """Whether the current window holds results and has ended: time to `flush` or `tick`."""
        with self._lock:
            return self._reservoir.due()

    def tick(self) -> None:
        """Write the current window if its end has passed, for streams that went quiet."""
        with self._lock:
            for sample in self._reservoir.close_expired():
                self._write_window(sample)

    def flush(self) -> None:
        """Close the current window now and write its samples (on shutdown, in tests)."""
        with self._lock:
            self._write_window(self._reservoir.flush())

    # Read -----------------------------------------------------------------------

    def samples(self, *, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Kept samples with ``seq > after``, newest first, at most `limit`."""
        with self._lock:
            out: list[dict[str, Any]] = []
            for record in reversed(self._recent):
                if record["seq"] <= after or (limit is not None and len(out) >= limit):
                    break
                out.append(record)
            return out

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def stats(self) -> dict[str, int]:
        """``seen``: results offered; ``sampled``: samples written; ``withdrawn``: results
        and samples dropped for a retraction; all since this start."""
        with self._lock:
            return {"seen": self._seen, "sampled": self._sampled, "withdrawn": self._withdrawn}

    # Internals ----------------------------------------------------------------

    def _write_window(self, sample: list[dict[str, Any]]) -> None:
        if not sample:
            return
        sampled_at_ms = time.time() * 1000.0
        lines: list[str] = []
        records: list[dict[str, Any]] = []
        for result in sample:
            record = {k: v for k, v in result.items() if k != "thumbnail"}
            thumbnail = result.get("thumbnail")
            thumb: str | None = None
            if thumbnail:
                thumb = f"{safe_name(str(result.get('media_key') or ''))}.jpg"
                # Thumbnail first: a line never names a file that is not there yet.
                _write_atomic(self.thumbs_dir / thumb, bytes(thumbnail))
            self._seq += 1
            record.update(thumb=thumb, sampled_at_ms=sampled_at_ms, seq=self._seq)
            record = _json_safe(record)
            lines.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            records.append(record)
        with self.samples_path.open("a", encoding="utf-8") as fh:
            fh.writelines(lines)
        self._recent.extend(records)
        self._sampled += len(records)
        metrics.SINK_SAMPLED.inc(len(records))

    def _load_tail(self) -> None:
        """Reload the last `keep` samples of an earlier run so the gallery is not empty."""
        try:
            size = self.samples_path.stat().st_size
        except FileNotFoundError:
            return
        want = self.keep * _TAIL_BYTES_PER_LINE
        with self.samples_path.open("rb") as fh:
            fh.seek(max(0, size - want))
            data = fh.read()
        raw_lines = data.splitlines()
        if size > want and raw_lines:
            raw_lines = raw_lines[1:]  # the first line is probably cut
        records: list[dict[str, Any]] = []
        retracted: set[Any] = set()
        for raw in raw_lines:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # a crash mid-write can leave a torn last line
            if isinstance(record, dict) and isinstance(record.get("retracted"), list):
                retracted.update(record["retracted"])
            elif isinstance(record, dict):
                records.append(record)
        records = [r for r in records if r.get("seq") not in retracted][-self.keep :]
        for record in records:
            seq = record.get("seq")
            # Old lines without a seq (or out of order) get the next free number.
            if not isinstance(seq, int) or seq <= self._seq:
                seq = self._seq + 1
                record["seq"] = seq
            self._seq = seq
            self._recent.append(record)


# Gallery ------------------------------------------------------------------------------


class GalleryClients:
    """Pages that polled in the last `active_s` seconds (the page sends a random id per
    load; without one, its address stands in), at most `keep` remembered."""

    def __init__(
        self,
        *,
        active_s: float = 10.0,
        keep: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.active_s = active_s
        self.keep = keep
        self._clock = clock
        self._lock = threading.Lock()
        self._last: OrderedDict[str, float] = OrderedDict()

    def seen(self, client: str) -> None:
        with self._lock:
            self._last[client] = self._clock()
            self._last.move_to_end(client)
            while len(self._last) > self.keep:
                self._last.popitem(last=False)

    def count(self) -> int:
        with self._lock:
            since = self._clock() - self.active_s
            while self._last and next(iter(self._last.values())) < since:
                self._last.popitem(last=False)
            return len(self._last)


_SINK_KEY: web.AppKey[SampledSink] = web.AppKey("sink", SampledSink)
_STATUS_KEY: web.AppKey[GalleryStatus] = web.AppKey("status", GalleryStatus)
_CLIENTS_KEY: web.AppKey[GalleryClients] = web.AppKey("clients", GalleryClients)
#: A page's client id: what the page makes (crypto.randomUUID), nothing longer.
_CLIENT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "gallery.html", headers={"Cache-Control": "no-cache"})


async def _api_samples(request: web.Request) -> web.Response:
    sink = request.app[_SINK_KEY]
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query["limit"]) if "limit" in request.query else None
    except ValueError:
        raise web.HTTPBadRequest(text="after and limit must be integers") from None
    client = request.query.get("client", "")
    if not _CLIENT_ID.fullmatch(client):
        client = f"address:{request.remote}"
    request.app[_CLIENTS_KEY].seen(client)
    samples = sink.samples(after=after, limit=limit)
    body = {"samples": samples, "last_seq": sink.last_seq, "stats": sink.stats()}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def _api_status(request: web.Request) -> web.Response:
    # Off the loop: with a Prometheus configured, this asks it over HTTP.
    figures = await asyncio.to_thread(request.app[_STATUS_KEY].status)
    return web.json_response(_json_safe(figures), headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _thumb(request: web.Request) -> web.StreamResponse:
    sink = request.app[_SINK_KEY]
    name = request.match_info["name"]
    # Only names we could have written; anything with a dot-dot, slash or odd byte is out.
    if not _THUMB_NAME.fullmatch(name):
        raise web.HTTPNotFound()
    root = sink.thumbs_dir.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(
        path, headers={"Content-Type": "image/jpeg", "Cache-Control": "max-age=3600"}
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "last_seq": request.app[_SINK_KEY].last_seq})


def make_gallery_app(sink: SampledSink, *, prometheus_url: str | None = None) -> web.Application:
    """The gallery: ``/``, ``/api/samples?after=SEQ``, ``/api/status``, ``/thumbs/{name}``,
    ``/healthz`` and ``/metrics``. The status strip reads `prometheus_url` when given."""
    app = web.Application(middlewares=[_security_headers])
    app[_SINK_KEY] = sink
    app[_STATUS_KEY] = GalleryStatus(sink.view, prometheus_url=prometheus_url)
    clients = app[_CLIENTS_KEY] = GalleryClients()
    metrics.GALLERY_CLIENTS.set_function(clients.count)
    app.router.add_get("/", _page)
    app.router.add_get("/api/samples", _api_samples)
    app.router.add_get("/api/status", _api_status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/thumbs/{name}", _thumb)
    app.router.add_get("/healthz", _healthz)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    return app


async def serve_gallery(
    sink: SampledSink, *, host: str, port: int, prometheus_url: str | None = None
) -> tuple[web.AppRunner, str]:
    """Start the gallery on `host`:`port` (0: a free port); return the runner and its URL.

    Stop it with ``await runner.cleanup()``.
    """
    app = make_gallery_app(sink, prometheus_url=prometheus_url)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    # A wildcard bind is reachable on loopback; the URL should be one a browser can open.
    if bound_host in ("0.0.0.0", ""):
        bound_host = "127.0.0.1"
    elif bound_host == "::":
        bound_host = "::1"
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}/"
