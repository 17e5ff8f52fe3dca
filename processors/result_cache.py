"""Results of photos seen before, so that a repeat costs neither a fetch nor inference.

A popular photo comes back again and again: retweets and quote tweets carry the same
media key, reposts of it the same URL, copies elsewhere the same bytes. `ResultCache`
keeps the newest results (bounded: `max_entries`, each for `ttl_s`) by media key, by URL
and, for photos this worker fetched, by the SHA-256 of their bytes, all for one model:
an entry made by another model id or version than the newest result's is never used,
so a model upgrade empties it in effect. Lookups count hits and misses (also as the
metric ``tagstream_agent_result_cache_lookups_total``).

The Faust agent fills it from the `hashtags` topic (processors/feedback.py) and answers a
hit with a HashtagResult of its own, marked ``cached``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from infra import metrics


@dataclass(frozen=True, slots=True)
class CachedResult:
    """What a new result for the same photo reuses."""

    hashtags: list[str]
    top_class: str
    scores: dict[str, float]
    model_id: str
    model_version: str
    thumbnail: bytes | None
    media_key: str  # of the photo that was classified
    stored_at: float


class ResultCache:
    """A bounded LRU of recent results, by media key, URL and image bytes, for one model."""

    def __init__(
        self, *, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 0 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 0 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, CachedResult] = OrderedDict()
        self._sha_of: OrderedDict[str, str] = OrderedDict()  # media key -> bytes' SHA-256
        self.model: tuple[str, str] | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def note_image(self, media_key: str, sha256: str) -> None:
        """The SHA-256 of a photo this worker sent on: its result will be found by bytes."""
        if self.max_entries:
            self._sha_of[media_key] = sha256
            self._sha_of.move_to_end(media_key)
            while len(self._sha_of) > self.max_entries:
                self._sha_of.popitem(last=False)

    def add(self, result: Mapping[str, Any]) -> None:
        """Keep a HashtagResult (read from `hashtags`); a cached answer is not re-kept."""
        if not self.max_entries or result.get("cached") or result.get("retraction"):
            return
        model = (result["model_id"], result["model_version"])
        self.model = model
        entry = CachedResult(
            hashtags=list(result["hashtags"]),
            top_class=result["top_class"],
            scores=dict(result["scores"]),
            model_id=model[0],
            model_version=model[1],
            thumbnail=result.get("thumbnail"),
            media_key=result["media_key"],
            stored_at=self._clock(),
        )
        keys = [f"m:{result['media_key']}", f"u:{result['url']}"]
        sha = self._sha_of.get(result["media_key"])
        if sha is not None:
            keys.append(f"b:{sha}")
        for key in keys:
            self._entries[key] = entry
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def count(self, *, hit: bool) -> None:
        """Count one photo's outcome (a photo may be looked up twice: before its fetch by
        media key and URL, after it by its bytes)."""
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        metrics.RESULT_CACHE_LOOKUPS.labels(outcome="hit" if hit else "miss").inc()

    def lookup(
        self, *, media_key: str | None = None, url: str | None = None, sha256: str | None = None
    ) -> CachedResult | None:
        """The cached result for this photo under the current model, or None."""
        now = self._clock()
        for key in (
            f"m:{media_key}" if media_key else None,
            f"u:{url}" if url else None,
            f"b:{sha256}" if sha256 else None,
        ):
            if key is None:
                continue
            entry = self._entries.get(key)
            if entry is None:
                continue
            if now - entry.stored_at > self.ttl_s:
                del self._entries[key]
                continue
            if (entry.model_id, entry.model_version) != self.model:
                continue
            self._entries.move_to_end(key)
            return entry
        return None
