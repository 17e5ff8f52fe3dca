"""Builders for the records that every stage writes the same way."""

from __future__ import annotations

import time


def now_ms() -> float:
    """Wall-clock epoch milliseconds, the unit of every timestamp on our records."""
    return time.time() * 1000.0


def dead_letter(
    *,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    stage: str,
    error: BaseException,
    tweet_id: str | None = None,
    media_key: str | None = None,
    url: str | None = None,
    payload: bytes | None = None,
) -> dict:
    """A DeadLetter record for `error`, raised while processing the given source record."""
    return {
        "source_topic": source_topic,
        "source_partition": source_partition,
        "source_offset": source_offset,
        "stage": stage,
        "error_class": type(error).__name__,
        "message": str(error)[:2000] or type(error).__name__,
        "tweet_id": tweet_id,
        "media_key": media_key,
        "url": url,
        "payload": payload,
        "failed_at_ms": now_ms(),
    }
