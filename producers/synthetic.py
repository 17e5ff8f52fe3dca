"""Synthetic demo traffic shaped exactly like lines of the X API v2 filtered stream.

Without an X API token the demo still needs tweets: `SyntheticTweets.line(n)` returns the
n-th stream line, deterministically, whose photos live on the demo image server
(`infra.image_server`), so the class of every good photo is known from its URL. The
mix covers what the pipeline must cope with: one or several photos, videos and GIFs that
are not fetched, tweets without media, and photos that fail on purpose (404, slow, HTML,
huge, corrupt). Texts carry markup and ampersands to exercise escaping downstream.

`SyntheticSource` is the tweet source of ``tagstream produce synthetic``: line *n* at
*n / rate* seconds, resumable after the last line delivered (its position is *n*).
`write_archive` keeps lines of the generator as a stream archive instead, with the
class of every photo that shows one: a fixed demo stream to replay and evaluate on
(``tagstream demo-archive``, ``tagstream evaluate``).
"""

from __future__ import annotations

import asyncio
import html
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from infra.demo_images import DEMO_CLASSES
from infra.image_server import truth_from_url
from producers.archive import StreamArchive
from producers.source import SourceItem, TweetSource
from producers.tweets import tweet_from_stream_line
from schemas.records import Tweet, now_ms

#: Every kind of line `SyntheticTweets.kind` may return.
KINDS: tuple[str, ...] = (
    "photo",
    "multi_photo",
    "video",
    "animated_gif",
    "mixed",
    "no_media",
    "fault_404",
    "fault_slow",
    "fault_html",
    "fault_huge",
    "fault_corrupt",
)
FAULT_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k.startswith("fault_"))

#: X media key prefixes: 3 photo, 7 video, 16 animated GIF.
_KEY_PREFIX = {"photo": "3", "video": "7", "animated_gif": "16"}
_ID_BASE = 1_790_000_000_000_000_000
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
_PHOTO_PX = 160
_HUGE_MB = 20

_RULES = (
    {"id": "1790000000000000101", "tag": "animal photos"},
    {"id": "1790000000000000102", "tag": "pets"},
    {"id": "1790000000000000103", "tag": "wildlife"},
)

_WORDS = {
    "butterfly": "butterfly",
    "cats": "cat",
    "cow": "cow",
    "dogs": "dog",
    "elephant": "elephant",
    "hen": "hen",
    "horse": "horse",
    "monkey": "monkey",
    "others": "thing",
    "panda": "panda",
    "sheep": "sheep",
    "spider": "spider",
    "squirrel": "squirrel",
}

_MENTIONING = (
    "Look at this {word}!",
    "My {word} this morning \N{SMILING FACE WITH HEART-SHAPED EYES}",
    "Best {word} photo I have taken & it is not even close",
    "Is this a {word}? <b>asking for a friend</b>",
    "{word} spotted in the park #nature",
)
_PLAIN = (
    "Weekend vibes",
    "Guess what I saw today",
    "No filter needed \N{CAMERA}",
    "Tom & Jerry would approve <3",
    "<script>alert('hi')</script> totally normal caption",
    "Rate this 1-10 & be honest",
    "",
)


class SyntheticTweets:
    """Deterministic X API v2 filtered-stream lines for the demo.

    Fractions are of all lines: `fault_fraction` (one failing photo, sometimes after a
    good one), `no_media_fraction`, `video_fraction` (video only, GIF only, or a photo
    mixed with a video) and `multi_photo_fraction` (2-4 photos); the rest carry one photo.
    """

    def __init__(
        self,
        *,
        image_base_url: str,
        seed: int = 0,
        fault_fraction: float = 0.1,
        no_media_fraction: float = 0.1,
        video_fraction: float = 0.1,
        multi_photo_fraction: float = 0.2,
        slow_delay_s: float = 30.0,
    ) -> None:
        fractions = {
            "fault_fraction": fault_fraction,
            "no_media_fraction": no_media_fraction,
            "video_fraction": video_fraction,
            "multi_photo_fraction": multi_photo_fraction,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {value}")
        if sum(fractions.values()) > 1.0 + 1e-9:
            raise ValueError(f"the fractions add up to more than 1: {fractions}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if slow_delay_s < 0:
            raise ValueError(f"slow_delay_s must be >= 0, got {slow_delay_s}")
        self.image_base_url = image_base_url.rstrip("/")
        self.seed = seed
        self.slow_delay_s = slow_delay_s
        # Cumulative thresholds for the first draw of every line.
        self._cuts = (
            ("fault", fault_fraction),
            ("no_media", fault_fraction + no_media_fraction),
            ("video", fault_fraction + no_media_fraction + video_fraction),
            (
                "multi_photo",
                fault_fraction + no_media_fraction + video_fraction + multi_photo_fraction,
            ),
        )

    def _rng(self, n: int) -> random.Random:
        if n < 0:
            raise ValueError(f"line number must be >= 0, got {n}")
        # A str seed is hashed with SHA-512 by `random`: stable across runs and processes.
        return random.Random(f"tagstream-synthetic:{self.seed}:{n}")

    def _draw_kind(self, rng: random.Random) -> str:
        u = rng.random()
        group = next((name for name, cut in self._cuts if u < cut), "photo")
        if group == "fault":
            return rng.choice(FAULT_KINDS)
        if group == "video":
            return rng.choices(("video", "animated_gif", "mixed"), weights=(4, 3, 3))[0]
        return group

    def kind(self, n: int) -> str:
        """The kind of line n, one of `KINDS` (what `line(n)` was built as)."""
        return self._draw_kind(self._rng(n))

    def tweet_id(self, n: int) -> str:
        """The numeric tweet id of line n, unique per (seed, n)."""
        return str(_ID_BASE + self.seed * 1_000_000_000 + n)

    def line(self, n: int) -> dict[str, Any]:
        """The n-th stream line, the same for the same (seed, n)."""
        rng = self._rng(n)
        kind = self._draw_kind(rng)
        media: list[dict[str, Any]] = []
        classes: list[str] = []

        def add_photo(url: str, cls: str | None) -> None:
            media.append(self._media("photo", n, len(media), url=url))
            if cls is not None:
                classes.append(cls)

        def add_good_photo(cls: str | None = None) -> None:
            cls = cls or rng.choice(DEMO_CLASSES)
            add_photo(self._img_url(cls, rng), cls)

        if kind == "photo":
            add_good_photo()
        elif kind == "multi_photo":
            first = rng.choice(DEMO_CLASSES)
            same = rng.random() < 0.5
            for _ in range(rng.randint(2, 4)):
                add_good_photo(first if same else None)
        elif kind in ("video", "animated_gif"):
            cls = rng.choice(DEMO_CLASSES)
            media.append(self._media(kind, n, 0, preview=self._img_url(cls, rng)))
        elif kind == "mixed":
            add_good_photo()
            cls = rng.choice(DEMO_CLASSES)
            media.append(self._media("video", n, 1, preview=self._img_url(cls, rng)))
        elif kind.startswith("fault_"):
            if rng.random() < 1 / 3:
                add_good_photo()  # a partly failing tweet: one photo works, one does not
            key = f"3_{n}_{len(media)}"
            cls = rng.choice(DEMO_CLASSES)
            add_photo(self._fault_url(kind, key, cls, rng), cls if kind == "fault_slow" else None)
        # "no_media": neither attachments nor includes, as the API sends it.

        data: dict[str, Any] = {
            "id": self.tweet_id(n),
            # The API sends text with &, < and > as HTML entities; so do we.
            "text": html.escape(self._text(rng, classes), quote=False),
            "author_id": str(1_000_000 + rng.randrange(500)),
            "created_at": (_EPOCH + timedelta(milliseconds=500 * n)).strftime(
                "%Y-%m-%dT%H:%M:%S.%f"
            )[:-3]
            + "Z",
        }
        out: dict[str, Any] = {"data": data}
        if media:
            data["attachments"] = {"media_keys": [m["media_key"] for m in media]}
            # The API does not promise includes in attachment order; neither do we.
            included = list(media)
            rng.shuffle(included)
            out["includes"] = {"media": included}
        out["matching_rules"] = [dict(r) for r in rng.sample(_RULES, rng.randint(1, 2))]
        return out

    def _img_url(self, cls: str, rng: random.Random) -> str:
        return f"{self.image_base_url}/img/{cls}/{rng.randrange(1_000_000)}.jpg"

    def _fault_url(self, kind: str, key: str, cls: str, rng: random.Random) -> str:
        base = self.image_base_url
        if kind == "fault_404":
            return f"{base}/status/404/{key}.jpg"
        if kind == "fault_slow":
            return f"{base}/slow/{cls}/{rng.randrange(1_000_000)}.jpg?delay={self.slow_delay_s:g}"
        if kind == "fault_html":
            return f"{base}/html/{key}.jpg"
        if kind == "fault_huge":
            return f"{base}/huge/{key}.jpg?mb={_HUGE_MB}"
        if kind == "fault_corrupt":
            return f"{base}/corrupt/{key}.jpg"
        raise ValueError(f"not a fault kind: {kind!r}")

    @staticmethod
    def _media(
        mtype: str, n: int, i: int, *, url: str | None = None, preview: str | None = None
    ) -> dict[str, Any]:
        item: dict[str, Any] = {"media_key": f"{_KEY_PREFIX[mtype]}_{n}_{i}", "type": mtype}
        if mtype == "photo":
            item.update(url=url, width=_PHOTO_PX, height=_PHOTO_PX)
        else:
            item.update(preview_image_url=preview, width=1280, height=720)
        return item

    @staticmethod
    def _text(rng: random.Random, classes: list[str]) -> str:
        if classes and rng.random() < 0.5:
            return rng.choice(_MENTIONING).format(word=_WORDS[rng.choice(classes)])
        return rng.choice(_PLAIN)


def tweet_from_archived(
    line: dict[str, Any],
    *,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet of an archived synthetic line (X API v2 shaped, but not from X: no
    x.com page, and ``network`` says where it is from)."""
    return tweet_from_stream_line(
        line,
        source=source,
        ingested_at_ms=ingested_at_ms,
        replay_run_id=replay_run_id,
        network=SyntheticSource.archive_format,
    )


class SyntheticSource(TweetSource):
    """Lines ``start`` .. ``start + count - 1`` of `SyntheticTweets` (``count`` 0: forever),
    line *n* due *(n - first) / rate* seconds after the first (``rate`` 0: no waiting)."""

    name = "synthetic"
    dead_letter_stage = "synthetic"
    archive_format = "synthetic"

    def __init__(
        self,
        generator: SyntheticTweets,
        *,
        rate: float,
        count: int,
        start: int = 0,
    ) -> None:
        if rate < 0 or count < 0 or start < 0:
            raise ValueError("rate, count and start must be >= 0")
        self.generator = generator
        self.rate = rate
        self.first = start
        self.end = start + count if count else None
        self.speed = 1.0 if rate > 0 else None

    def start_after(self, position: Any) -> None:
        # A restart goes on after the last line delivered; the end stays where it was.
        self.first = int(position) + 1

    async def items(self) -> AsyncIterator[SourceItem]:
        n = self.first
        while self.end is None or n < self.end:
            # The same as its replay reads it back (`tweet_from_archived`).
            tweet = tweet_from_archived(
                self.generator.line(n), source=self.name, ingested_at_ms=now_ms()
            )
            t_ms = (n - self.first) * 1000.0 / self.rate if self.rate else None
            yield SourceItem(tweet=tweet, t_ms=t_ms, position=n)
            n += 1
            if n % 256 == 0:
                await asyncio.sleep(0)  # unpaced: let the loop serve stop signals


def write_archive(
    generator: SyntheticTweets,
    folder: Path,
    *,
    count: int,
    rate: float = 20.0,
    start: int = 0,
) -> dict[str, str]:
    """Archive lines `start` .. `start + count - 1` of `generator` into `folder` as a
    stream archive (producers/archive.py), line *n* received *(n - start) / rate*
    seconds after 2025-01-01T00:00Z, so that a replay at 1x keeps that pace. Returns the
    class each photo of a demo class shows, by media key (photos that fail on purpose
    show none, except the slow ones)."""
    if count < 1 or rate <= 0:
        raise ValueError("count must be at least 1 and rate positive")
    truth: dict[str, str] = {}
    t0_ms = _EPOCH.timestamp() * 1000.0
    with StreamArchive(folder) as archive:
        for n in range(start, start + count):
            line = generator.line(n)
            archive.write(
                line,
                t_ms=t0_ms + (n - start) * 1000.0 / rate,
                line_format=SyntheticSource.archive_format,
            )
            for item in (line.get("includes") or {}).get("media", []):
                cls = truth_from_url(item.get("url") or "") if item["type"] == "photo" else None
                if cls is not None:
                    truth[item["media_key"]] = cls
    return truth
