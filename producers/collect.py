"""`tagstream collect`: a noisy image set, one folder per tag, from X API v2 recent search.

This is the unlabelled set of the semi-supervised loop (Yalniz et al. 2019): a teacher
labels it, a student learns from those labels. For each tag, `collect` searches
``#tag has:images -is:retweet`` first and, when that runs out, the tag's words
(``(cat OR cats) has:images -is:retweet`` for ``cats``: the singular and plural of the tag,
as the ELEN 6889 report's keyword rules did), following ``next_token`` page by page until
the tag has `per_class` photos, both queries are exhausted, or a query has given `max_pages` pages.

Photos go through the safe fetcher, `infra.fetcher.ImageFetcher` (SSRF guard, byte cap, content
sniffing), must decode fully with Pillow, and are skipped when they repeat one already
kept, for this tag or any other: the same URL, the same bytes (SHA-256), or nearly the
same picture (a 64-bit perceptual hash within `near_threshold` bits). They are written
atomically to ``<out>/<tag>/<tweet id>_<media key>.jpg``: JPEGs as they came, anything
else re-encoded to JPEG. A tag never gets more than `per_class` files from this command.

Runs resume: the files already in ``<out>/<folder>/`` count towards their tag and go into
the duplicate index (every folder, so another tag's images are duplicates too). What was
read, saved and skipped is in ``<out>/collect.json``, rewritten as pages come.

The bearer token is unwrapped only for the Authorization header (see `producers.xapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image
from pydantic import SecretStr

from infra.exceptions import CodecError, ConfigurationError, DecodeImageError, FetchError
from infra.fetcher import ImageFetcher
from infra.images import upright
from infra.settings import Settings
from producers.posts import tag_words
from producers.tweets import tweet_from_stream_line
from producers.xapi import (
    RATE_LIMIT_FIRST_S,
    STREAM_PARAMS,
    XApiClient,
    XApiError,
    http_backoff,
    require_token,
)
from schemas.records import photos

log = logging.getLogger(__name__)

SEARCH_PATH = "/2/tweets/search/recent"
#: The same expansions and fields as the filtered stream: photos' urls under includes.media.
SEARCH_PARAMS = STREAM_PARAMS

#: A 429 waits until ``x-rate-limit-reset``, but never longer than the 15-min rate window.
RATE_LIMIT_WAIT_MAX_S = 900.0
#: A reset already past (clock skew) still waits this long.
RATE_LIMIT_WAIT_MIN_S = 1.0
#: 429s in a row on one page before giving up.
MAX_RATE_LIMITED = 8
#: Tries of one page through 5xx answers and network errors (back-off from 5 s, doubling).
MAX_ATTEMPTS = 5

DEFAULT_MAX_PAGES = 50
DEFAULT_NEAR_THRESHOLD = 6
#: Larger than any photo X serves (4096 x 4096); more is a decompression bomb.
MAX_PIXELS = 40_000_000
JPEG_QUALITY = 95
MANIFEST_NAME = "collect.json"
MANIFEST_EVERY_S = 5.0
#: Files in a tag folder that count as its images on resume.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
#: Error messages kept per tag in the manifest (the counts are complete).
MAX_ERRORS_KEPT = 20

#: A tag is a hashtag: letters, digits and underscores (and a safe folder name).
_TAG = re.compile(r"^\w+$")
_UNSAFE = re.compile(r"[^\w-]")


# Tags and queries ------------------------------------------------------------------


def parse_tags(spec: str | Iterable[str]) -> list[str]:
    """The tags of ``"cats,dogs"`` (or a list), in order, without repeats; validated."""
    raw = spec.split(",") if isinstance(spec, str) else list(spec)
    tags = list(dict.fromkeys(t.strip() for t in raw if t.strip()))
    if not tags:
        raise ConfigurationError("no tags given (e.g. --tags cats,dogs)")
    bad = [t for t in tags if not _TAG.match(t)]
    if bad:
        raise ConfigurationError(
            f"tags must be letters, digits and underscores (a hashtag): {', '.join(bad)}"
        )
    return tags


def search_queries(tag: str) -> list[str]:
    """The queries of one tag, in the order they are searched: hashtag, then keywords.

    ``cats`` gives ``#cats has:images -is:retweet`` then ``(cat OR cats) has:images
    -is:retweet``; ``sheep`` gives ``sheep has:images -is:retweet`` as its second.
    """
    words = tag_words(tag)
    keywords = words[0] if len(words) == 1 else f"({' OR '.join(words)})"
    return [f"#{tag} has:images -is:retweet", f"{keywords} has:images -is:retweet"]


# Images: decoding, hashing, duplicates -----------------------------------------------

_DCT_N = 32
# DCT-II basis: row k, column n. Its scale does not matter, the hash compares to a median.
_DCT = np.cos(np.pi * (2 * np.arange(_DCT_N)[None, :] + 1) * np.arange(_DCT_N)[:, None] / 64)


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit pHash of `image`: signs of its 8x8 lowest DCT frequencies against their median.

    The image is reduced to 32x32 grey first, so re-encoding, resizing and small colour
    changes flip few bits; different pictures differ in about half of them.
    """
    grey = image.convert("L").resize((_DCT_N, _DCT_N), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class ExaminedImage:
    """A fetched image that decodes: the bytes to write and what identifies it."""

    data: bytes
    sha256: str
    source_sha256: str
    phash: int
    width: int
    height: int


def examine_image(data: bytes) -> ExaminedImage:
    """Decode `data` fully and hash it; raises `DecodeImageError` for anything unusable.

    The bytes are untrusted: any decoder failure, too many pixels (a decompression bomb)
    or a truncated file is a rejection, never a crash. JPEGs are kept as they came, other
    formats re-encoded as JPEG.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_PIXELS:
                raise DecodeImageError(f"too many pixels: {width}x{height} > {MAX_PIXELS}")
            fmt = probe.format
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            rgb = upright(image).convert("RGB")  # decodes every pixel: verify() does not
    except DecodeImageError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types on hostile input
        raise DecodeImageError(
            f"cannot decode ({len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from None
    source_sha = hashlib.sha256(data).hexdigest()
    if fmt == "JPEG":
        out = data
    else:
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
        out = buf.getvalue()
    return ExaminedImage(
        data=out,
        sha256=hashlib.sha256(out).hexdigest(),
        source_sha256=source_sha,
        phash=perceptual_hash(rgb),
        width=rgb.width,  # upright, as a viewer shows it
        height=rgb.height,
    )


class DuplicateIndex:
    """Every kept image's SHA-256s and perceptual hash, for exact and near duplicates."""

    def __init__(self, near_threshold: int) -> None:
        self.near_threshold = near_threshold
        self._by_sha: dict[str, str] = {}
        self._hashes = np.zeros(1024, dtype=">u8")
        self._names: list[str] = []

    def __len__(self) -> int:
        return len(self._names)

    def exact(self, *shas: str | None) -> str | None:
        """The kept file with one of these SHA-256s, if any."""
        for sha in shas:
            if sha and sha in self._by_sha:
                return self._by_sha[sha]
        return None

    def near(self, phash: int) -> tuple[str, int] | None:
        """The closest kept file within `near_threshold` bits, and its distance."""
        n = len(self._names)
        if n == 0 or self.near_threshold < 0:
            return None
        xor = self._hashes[:n] ^ np.array(phash, dtype=">u8")
        distances = np.unpackbits(xor.view(np.uint8).reshape(n, 8), axis=1).sum(axis=1)
        best = int(np.argmin(distances))
        if distances[best] <= self.near_threshold:
            return self._names[best], int(distances[best])
        return None

    def add(self, name: str, phash: int, *shas: str | None) -> None:
        n = len(self._names)
        if n == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._hashes[n] = phash
        self._names.append(name)
        for sha in shas:
            if sha:
                self._by_sha.setdefault(sha, name)


# The X API recent search ---------------------------------------------------------------


class RecentSearch(XApiClient):
    """An async client of ``GET /2/tweets/search/recent``, one page per call.

    A 429 waits until ``x-rate-limit-reset`` (at most 15 min; from 60 s, doubling, without
    the header) and asks for the same page again; 5xx answers and network errors back off
    from 5 s, doubling, for `max_attempts` tries; any other refusal raises `XApiError`.
    `backoffs` holds every delay slept, in order.
    """

    def __init__(
        self,
        *,
        base_url: str,
        bearer_token: SecretStr,
        max_results: int = 100,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        timeout_s: float = 30.0,
        max_attempts: int = MAX_ATTEMPTS,
        max_rate_limited: int = MAX_RATE_LIMITED,
    ) -> None:
        if not 10 <= max_results <= 100:
            raise ConfigurationError(f"max_results must be in 10..100, got {max_results}")
        super().__init__(base_url=base_url, bearer_token=bearer_token)
        self.max_results = max_results
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 10.0))
        self.max_attempts = max_attempts
        self.max_rate_limited = max_rate_limited
        self.counters: Counter[str] = Counter()
        self.backoffs: list[float] = []

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=self._timeout)

    def _rate_limit_delay(self, reset: str | None, times: int) -> float:
        reset_at = None
        if reset is not None:
            with contextlib.suppress(ValueError):
                reset_at = float(reset)
        if reset_at is None:
            return min(RATE_LIMIT_FIRST_S * 2 ** (times - 1), RATE_LIMIT_WAIT_MAX_S)
        until_reset = reset_at - self._wall_clock()
        return min(max(until_reset, RATE_LIMIT_WAIT_MIN_S), RATE_LIMIT_WAIT_MAX_S)

    async def page(self, query: str, next_token: str | None = None) -> dict[str, Any]:
        """One page of results: ``{"data": [...], "includes": {...}, "meta": {...}}``."""
        params = {"query": query, "max_results": str(self.max_results), **SEARCH_PARAMS}
        if next_token:
            params["next_token"] = next_token
        where = f"GET {SEARCH_PATH} {query!r}"
        failures = 0
        limited = 0
        while True:
            try:
                async with self._http().get(
                    self.base_url + SEARCH_PATH, params=params, headers=self._headers()
                ) as resp:
                    status = resp.status
                    text = await resp.text(errors="replace")
                    reset = resp.headers.get("x-rate-limit-reset")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # Only the type: aiohttp errors can carry the request and its headers.
                self.counters["network_errors"] += 1
                reason = f"network error: {type(exc).__name__}"
            else:
                if status == 200:
                    payload = None
                    with contextlib.suppress(ValueError):
                        payload = json.loads(text)
                    if isinstance(payload, dict):
                        self.counters["pages"] += 1
                        return payload
                    reason = "answer is not a JSON object"
                elif status == 429:
                    self.counters["http_429"] += 1
                    limited += 1
                    if limited > self.max_rate_limited:
                        raise XApiError(f"{where}: still rate limited after {limited - 1} waits")
                    delay = self._rate_limit_delay(reset, limited)
                    self.backoffs.append(delay)
                    log.warning("X search rate limited; waiting %.0f s for the reset", delay)
                    await self._sleep(delay)
                    continue
                else:
                    self.counters[f"http_{status}"] += 1
                    if status < 500:
                        # 400/401/403/404 and the rest of 4xx: waiting will not fix them.
                        # Redact before cutting: a cut token would no longer match.
                        body = self._redact(text)[:500]
                        raise XApiError(self._redact(f"{where}: HTTP {status}: {body}"))
                    reason = f"HTTP {status}"
            failures += 1
            if failures >= self.max_attempts:
                # `reason` is a status or an exception type: nothing echoed back.
                raise XApiError(f"{where}: gave up after {failures} attempts; last: {reason}")
            delay = http_backoff(failures)
            self.backoffs.append(delay)
            log.warning("X search: %s; retrying in %.0f s", reason, delay)
            await self._sleep(delay)


# The collector --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    tweet_id: str
    media_key: str
    url: str
    query: str

    @property
    def filename(self) -> str:
        # Ids come from the API, untrusted: nothing in a name may leave the folder.
        return f"{_UNSAFE.sub('_', self.tweet_id)}_{_UNSAFE.sub('_', self.media_key)}.jpg"


def _new_report(existing: int) -> dict[str, Any]:
    return {
        "existing": existing,
        "saved": existing,
        "saved_new": 0,
        "complete": False,
        "pages": 0,
        "tweets": 0,
        "duplicates_url": 0,
        "duplicates_exact": 0,
        "duplicates_near": 0,
        "not_photo": 0,
        "fetch_failed": 0,
        "rejected": 0,
        "malformed": 0,
        "queries": [],
        "errors": [],
    }


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class _Collector:
    """The state of one `collect` run: index, reports, manifest."""

    def __init__(
        self,
        out: Path,
        tags: list[str],
        per_class: int,
        near_threshold: int,
        wall_clock: Callable[[], float],
        options: dict[str, Any],
        window: int,
    ) -> None:
        self.out = out
        self.window = window
        self.tags = tags
        self.per_class = per_class
        self.index = DuplicateIndex(near_threshold)
        self.wall_clock = wall_clock
        self.options = options
        self.seen_urls: set[str] = set()
        self.files: dict[str, dict[str, Any]] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        self.started_at = _now_iso()
        self._written_at = -float("inf")

    # Resume -----------------------------------------------------------------------

    def load_existing(self) -> None:
        """Index every image already under `out`; count those of our tags."""
        prior: dict[str, Any] = {}
        path = self.out / MANIFEST_NAME
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                files = loaded.get("files") if isinstance(loaded, dict) else None
                prior = files if isinstance(files, dict) else {}
            except (OSError, ValueError) as exc:
                log.warning("%s unreadable (%s); hashing the files again", path, exc)
        existing: Counter[str] = Counter()
        folders = (p for p in self.out.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in sorted(folders):
            for file in sorted(folder.iterdir()):
                if file.name.endswith(".part") and file.is_file():
                    file.unlink()  # a write that never finished
                    continue
                if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                    continue
                name = f"{folder.name}/{file.name}"
                if self._load_file(name, file, prior.get(name)):
                    existing[folder.name] += 1
        for tag in self.tags:
            self.reports[tag] = _new_report(existing[tag])
        if self.files:
            log.info("resuming: %d images already in %s", len(self.files), self.out)

    def _load_file(self, name: str, file: Path, entry: Any) -> bool:
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if isinstance(entry, dict) and entry.get("sha256") == sha and entry.get("phash"):
            try:
                phash = int(entry["phash"], 16)
            except (TypeError, ValueError):
                entry = None
            else:
                self.index.add(name, phash, sha, entry.get("source_sha256"))
                if isinstance(entry.get("url"), str):
                    self.seen_urls.add(entry["url"])
                self.files[name] = entry
                return True
        try:
            examined = examine_image(data)
        except DecodeImageError as exc:
            log.warning("%s: not counted, %s", file, exc)
            return False
        self.index.add(name, examined.phash, sha, examined.source_sha256)
        self.files[name] = {
            "tag": name.split("/", 1)[0],
            "sha256": sha,
            "phash": f"{examined.phash:016x}",
            "width": examined.width,
            "height": examined.height,
        }
        return True

    # Manifest ---------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return {
            "per_class": self.per_class,
            "near_threshold": self.index.near_threshold,
            **self.options,
            "started_at": self.started_at,
            "updated_at": _now_iso(),
            "tags": self.reports,
            "files": dict(sorted(self.files.items())),
        }

    def write_manifest(self, *, at_most_every_s: float = 0.0) -> dict[str, Any] | None:
        """Write ``collect.json`` atomically, unless written less than `at_most_every_s` ago."""
        if time.monotonic() - self._written_at < at_most_every_s:
            return None
        manifest = self.manifest()
        path = self.out / MANIFEST_NAME
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(part, path)
        self._written_at = time.monotonic()
        return manifest

    # Collecting -------------------------------------------------------------------

    def remaining(self, tag: str) -> int:
        return max(self.per_class - self.reports[tag]["saved"], 0)

    async def collect_tag(
        self, tag: str, search: RecentSearch, fetcher: ImageFetcher, max_pages: int | None
    ) -> None:
        report = self.reports[tag]
        if self.remaining(tag) == 0:
            report["complete"] = True
            log.info("%s: %d images already, nothing to collect", tag, report["saved"])
            return
        for query in search_queries(tag):
            status: dict[str, Any] = {"query": query, "pages": 0, "tweets": 0, "stopped": None}
            report["queries"].append(status)
            next_token: str | None = None
            while True:
                if max_pages is not None and status["pages"] >= max_pages:
                    status["stopped"] = "max_pages"
                    break
                page = await search.page(query, next_token)
                status["pages"] += 1
                report["pages"] += 1
                tweets_before = report["tweets"]
                await self._take_page(tag, query, page, fetcher)
                status["tweets"] += report["tweets"] - tweets_before
                log.info(
                    "%s: %r page %d: %d tweets; %d/%d saved",
                    tag,
                    query,
                    status["pages"],
                    report["tweets"] - tweets_before,
                    report["saved"],
                    self.per_class,
                )
                # Rewritten as it goes (an interrupted run leaves a useful one), but the
                # file list grows: not more often than every few seconds.
                self.write_manifest(at_most_every_s=MANIFEST_EVERY_S)
                meta = page.get("meta")
                token = meta.get("next_token") if isinstance(meta, dict) else None
                next_token = token if isinstance(token, str) and token else None
                if self.remaining(tag) == 0:
                    status["stopped"] = "full"
                    break
                if next_token is None:
                    status["stopped"] = "exhausted"
                    break
            if self.remaining(tag) == 0:
                break
        report["complete"] = self.remaining(tag) == 0

    def _candidates(self, tag: str, query: str, page: dict[str, Any]) -> list[_Candidate]:
        report = self.reports[tag]
        data = page.get("data") or []
        if not isinstance(data, list):
            raise XApiError(f"GET {SEARCH_PATH} {query!r}: 'data' is not a list")
        includes = page.get("includes") or {}
        ingested_ms = self.wall_clock() * 1000.0
        found: list[_Candidate] = []
        for item in data:
            try:
                # One line per tweet, with the page's includes: the stream's own parser.
                tweet = tweet_from_stream_line(
                    {"data": item, "includes": includes},
                    source="x-search",
                    ingested_at_ms=ingested_ms,
                )
            except CodecError as exc:
                report["malformed"] += 1
                self._note(tag, f"malformed tweet: {exc}")
                continue
            report["tweets"] += 1
            fetchable = photos(tweet)
            report["not_photo"] += len(tweet["media"]) - len(fetchable)
            found += [_Candidate(tweet["id"], m["media_key"], m["url"], query) for m in fetchable]
        return found

    async def _take_page(
        self, tag: str, query: str, page: dict[str, Any], fetcher: ImageFetcher
    ) -> None:
        report = self.reports[tag]
        candidates = self._candidates(tag, query, page)
        folder = self.out / tag
        folder.mkdir(parents=True, exist_ok=True)
        i = 0
        while i < len(candidates) and self.remaining(tag) > 0:
            # At most as many fetches as photos still wanted (every one may succeed, and
            # none is fetched that could not be kept), and no more than the fetcher runs
            # at once (their bytes wait here for the slowest).
            size = min(self.remaining(tag), self.window)
            window: list[_Candidate] = []
            while i < len(candidates) and len(window) < size:
                candidate = candidates[i]
                i += 1
                if candidate.url in self.seen_urls or (folder / candidate.filename).exists():
                    report["duplicates_url"] += 1
                    continue
                self.seen_urls.add(candidate.url)
                window.append(candidate)
            results = await asyncio.gather(*(self._fetch(fetcher, c) for c in window))
            for candidate, result in zip(window, results, strict=True):
                self._keep(tag, candidate, result)

    @staticmethod
    async def _fetch(
        fetcher: ImageFetcher, candidate: _Candidate
    ) -> ExaminedImage | FetchError | DecodeImageError:
        try:
            fetched = await fetcher.fetch(candidate.url)
            return await asyncio.to_thread(examine_image, fetched.data)
        except (FetchError, DecodeImageError) as exc:
            return exc

    def _keep(
        self, tag: str, candidate: _Candidate, result: ExaminedImage | FetchError | DecodeImageError
    ) -> None:
        report = self.reports[tag]
        if isinstance(result, FetchError):
            report["fetch_failed"] += 1
            self._note(tag, f"fetch: {result}")
            return
        if isinstance(result, DecodeImageError):
            report["rejected"] += 1
            self._note(tag, f"{candidate.url}: {result}")
            return
        same = self.index.exact(result.source_sha256, result.sha256)
        if same is not None:
            report["duplicates_exact"] += 1
            log.debug("%s: same bytes as %s", candidate.url, same)
            return
        near = self.index.near(result.phash)
        if near is not None:
            report["duplicates_near"] += 1
            log.debug("%s: %d bits from %s", candidate.url, near[1], near[0])
            return
        name = f"{tag}/{candidate.filename}"
        path = self.out / name
        part = path.with_name(path.name + ".part")
        part.write_bytes(result.data)
        os.replace(part, path)
        self.index.add(name, result.phash, result.sha256, result.source_sha256)
        self.files[name] = {
            "tag": tag,
            "tweet_id": candidate.tweet_id,
            "media_key": candidate.media_key,
            "url": candidate.url,
            "query": candidate.query,
            "sha256": result.sha256,
            "source_sha256": result.source_sha256,
            "phash": f"{result.phash:016x}",
            "width": result.width,
            "height": result.height,
        }
        report["saved"] += 1
        report["saved_new"] += 1

    def _note(self, tag: str, message: str) -> None:
        errors = self.reports[tag]["errors"]
        if len(errors) < MAX_ERRORS_KEPT:
            errors.append(message[:500])


async def collect(
    settings: Settings,
    tags: Iterable[str],
    per_class: int,
    out: Path | str,
    *,
    max_results: int = 100,
    max_pages: int | None = DEFAULT_MAX_PAGES,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    wall_clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Collect up to `per_class` photos per tag into ``out/<tag>/``; returns the manifest.

    Tags are searched one after the other, each by its `search_queries` in order, page
    by page (`max_results` tweets a page, at most `max_pages` pages a query; None: no
    limit); a page is fetched only while its tag still wants photos. `near_threshold`
    is the largest perceptual-hash distance (bits of 64) counted as the same picture;
    0 keeps only identical hashes out, -1 turns near duplicates off. `sleep` and
    `wall_clock` are the rate-limit and back-off waits' (tests inject them). Raises
    `ConfigurationError` for a missing token or bad arguments, and `XApiError` when the
    API refuses or keeps failing; ``out/collect.json`` is written either way.
    """
    tags = parse_tags(tags)
    if per_class < 1:
        raise ConfigurationError(f"per_class must be at least 1, got {per_class}")
    if not 10 <= max_results <= 100:  # checked again by RecentSearch; here before any I/O
        raise ConfigurationError(f"max_results must be in 10..100, got {max_results}")
    if max_pages is not None and max_pages < 1:
        raise ConfigurationError(f"max_pages must be at least 1, got {max_pages}")
    if not -1 <= near_threshold <= 64:
        raise ConfigurationError(f"near_threshold must be in -1..64, got {near_threshold}")
    token = require_token(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    collector = _Collector(
        out,
        tags,
        per_class,
        near_threshold,
        wall_clock,
        {"max_results": max_results, "max_pages": max_pages},
        window=settings.fetch_concurrency,
    )
    collector.load_existing()
    try:
        async with (
            RecentSearch(
                base_url=settings.x_api_base_url,
                bearer_token=token,
                max_results=max_results,
                sleep=sleep,
                wall_clock=wall_clock,
            ) as search,
            ImageFetcher.from_settings(settings) as fetcher,
        ):
            for tag in tags:
                await collector.collect_tag(tag, search, fetcher, max_pages)
    finally:
        manifest = collector.write_manifest()
    assert manifest is not None
    for tag, report in manifest["tags"].items():
        log.info("%s: %d/%d images (%d new)", tag, report["saved"], per_class, report["saved_new"])
    return manifest
