"""The typed records of tagstream: one TypedDict per ``schemas/*.avsc``, and their builders.

A record is a plain dict at run time (what the codec reads and writes, with no copy), typed
here so that a reader and mypy know its fields. Every process builds a record through its
builder below (keyword-only, defaults where the schema has them), so a field added to a
schema is added in one place. tests/unit/test_records.py fails when a TypedDict and its
``.avsc`` disagree on a field's name, type or optionality.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TypedDict


def now_ms() -> float:
    """Wall-clock epoch milliseconds, the unit of every timestamp on our records."""
    return time.time() * 1000.0


# Tweet.avsc ---------------------------------------------------------------------------


class Media(TypedDict):
    media_key: str
    type: str  # photo, video or animated_gif
    url: str | None  # photos only
    preview_image_url: str | None
    width: int | None
    height: int | None
    alt_text: str | None


class MatchingRule(TypedDict):
    id: str
    tag: str | None


class Tweet(TypedDict):
    id: str  # X tweet id; Bluesky AT URI; mastodon:<host>:<status id>: never collide
    text: str
    author_id: str | None
    created_at: str | None
    media: list[Media]
    matching_rules: list[MatchingRule]
    source: str  # the process that took it in: twitter, bluesky, mastodon, replay, ...
    ingested_at_ms: float
    replay_run_id: str | None
    network: str  # x, bluesky, mastodon, synthetic
    post_id: str | None
    post_url: str | None
    langs: list[str]
    tags: list[str]  # the author's own hashtags, without '#'
    operation: str  # create, update or delete (see OPERATIONS)
    revision: str | None


#: What a Tweet record stands for: a new post, a new version of one, or its deletion.
OPERATIONS: tuple[str, ...] = ("create", "update", "delete")


def media(
    *,
    media_key: str,
    type: str,  # noqa: A002 - the schema's field name
    url: str | None = None,
    preview_image_url: str | None = None,
    width: int | None = None,
    height: int | None = None,
    alt_text: str | None = None,
) -> Media:
    return Media(
        media_key=media_key,
        type=type,
        url=url,
        preview_image_url=preview_image_url,
        width=width,
        height=height,
        alt_text=alt_text,
    )


def tweet(
    *,
    id: str,  # noqa: A002 - the schema's field name
    text: str,
    source: str,
    ingested_at_ms: float,
    author_id: str | None = None,
    created_at: str | None = None,
    media: Sequence[Media] = (),
    matching_rules: Sequence[MatchingRule] = (),
    replay_run_id: str | None = None,
    network: str = "x",
    post_id: str | None = None,
    post_url: str | None = None,
    langs: Sequence[str] = (),
    tags: Sequence[str] = (),
    operation: str = "create",
    revision: str | None = None,
) -> Tweet:
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
    return Tweet(
        id=id,
        text=text,
        author_id=author_id,
        created_at=created_at,
        media=list(media),
        matching_rules=list(matching_rules),
        source=source,
        ingested_at_ms=float(ingested_at_ms),
        replay_run_id=replay_run_id,
        network=network,
        post_id=post_id,
        post_url=post_url,
        langs=list(langs),
        tags=list(tags),
        operation=operation,
        revision=revision,
    )


def deletion(
    *,
    id: str,  # noqa: A002 - the schema's field name
    network: str,
    source: str,
    ingested_at_ms: float,
    post_id: str | None = None,
    author_id: str | None = None,
    revision: str | None = None,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet record saying that post `id` was deleted: no text, no media."""
    return tweet(
        id=id,
        text="",
        source=source,
        ingested_at_ms=ingested_at_ms,
        author_id=author_id,
        replay_run_id=replay_run_id,
        network=network,
        post_id=post_id,
        operation="delete",
        revision=revision,
    )


def photos(tweet: Mapping) -> list[Media]:
    """The media of a Tweet that are photos with a url: what the pipeline fetches."""
    return [m for m in tweet.get("media") or [] if m.get("type") == "photo" and m.get("url")]


def rule_tags(tweet: Mapping) -> list[str]:
    """The tags of the rules a tweet matched (a rule's id when it has no tag)."""
    return [r["tag"] or r["id"] for r in tweet.get("matching_rules") or []]


# ImageEvent.avsc -----------------------------------------------------------------------


class ImageEvent(TypedDict):
    tweet_id: str
    media_key: str
    url: str
    position: int
    tweet_text: str
    matching_rules: list[str]
    content_type: str
    image: bytes
    source: str
    replay_run_id: str | None
    timestamps: dict[str, float]


def image_event(
    *,
    tweet: Mapping,
    photo: Mapping,
    position: int,
    content_type: str,
    image: bytes,
    timestamps: Mapping[str, float],
) -> ImageEvent:
    """The ImageEvent of one fetched photo of `tweet`."""
    return ImageEvent(
        tweet_id=tweet["id"],
        media_key=photo["media_key"],
        url=photo["url"],
        position=position,
        tweet_text=tweet.get("text") or "",
        matching_rules=rule_tags(tweet),
        content_type=content_type,
        image=image,
        source=tweet.get("source") or "unknown",
        replay_run_id=tweet.get("replay_run_id"),
        timestamps=dict(timestamps),
    )


# HashtagResult.avsc --------------------------------------------------------------------


class HashtagResult(TypedDict):
    tweet_id: str
    media_key: str
    url: str
    tweet_text: str
    hashtags: list[str]
    top_class: str
    scores: dict[str, float]
    model_id: str
    model_version: str
    consumer_id: str
    provider: str
    precision: str
    source: str
    replay_run_id: str | None
    thumbnail: bytes | None
    timestamps: dict[str, float]
    cached: bool
    retraction: bool


def hashtag_result(
    *,
    event: Mapping,
    hashtags: Sequence[str],
    top_class: str,
    scores: Mapping[str, float],
    model_id: str,
    model_version: str,
    consumer_id: str = "",
    provider: str = "",
    precision: str = "",
    thumbnail: bytes | None = None,
    timestamps: Mapping[str, float] | None = None,
    cached: bool = False,
) -> HashtagResult:
    """The result for the photo of ImageEvent `event`; `timestamps` extend the event's."""
    return HashtagResult(
        tweet_id=event["tweet_id"],
        media_key=event["media_key"],
        url=event["url"],
        tweet_text=event.get("tweet_text") or "",
        hashtags=list(hashtags),
        top_class=top_class,
        scores=dict(scores),
        model_id=model_id,
        model_version=model_version,
        consumer_id=consumer_id,
        provider=provider,
        precision=precision,
        source=event.get("source") or "unknown",
        replay_run_id=event.get("replay_run_id"),
        thumbnail=thumbnail,
        timestamps=dict(event.get("timestamps") or {}) | dict(timestamps or {}),
        cached=cached,
        retraction=False,
    )


def retraction(*, tweet: Mapping, timestamps: Mapping[str, float]) -> HashtagResult:
    """The withdrawal of every result of `tweet`'s post ingested before `tweet` was.

    For a deleted or edited post (`tweet` is its deletion or its new version). A consumer
    of `hashtags` drops every result with this ``tweet_id`` whose ``timestamps.ingested``
    is earlier than this record's, those it holds and those still to come: a retraction
    can overtake results, which take the longer way through `images` and inference.
    """
    return HashtagResult(
        tweet_id=tweet["id"],
        media_key="",
        url="",
        tweet_text="",
        hashtags=[],
        top_class="",
        scores={},
        model_id="",
        model_version="",
        consumer_id="",
        provider="",
        precision="",
        source=tweet.get("source") or "unknown",
        replay_run_id=tweet.get("replay_run_id"),
        thumbnail=None,
        timestamps={"ingested": float(tweet["ingested_at_ms"])} | dict(timestamps),
        cached=False,
        retraction=True,
    )


def retracts(withdrawal: Mapping, result: Mapping) -> bool:
    """Whether HashtagResult `withdrawal` (a retraction) withdraws `result`."""
    if not withdrawal.get("retraction") or result.get("retraction"):
        return False
    if result.get("tweet_id") != withdrawal.get("tweet_id"):
        return False
    before = (withdrawal.get("timestamps") or {}).get("ingested", float("inf"))
    return (result.get("timestamps") or {}).get("ingested", float("-inf")) < before


# ShedRecord.avsc -----------------------------------------------------------------------


class ShedRecord(TypedDict):
    tweet_id: str
    reason: str
    detail: str
    media_keys: list[str]
    admission_rate: float
    observed_rate: float
    tokens: float
    source: str
    replay_run_id: str | None
    shed_at_ms: float
    priority: str
    controller_mode: str
    capacity_images_per_s: float
    backlog_images: float
    estimated_delay_ms: float
    admitted_images_per_s: float


def shed_record(
    *,
    tweet: Mapping,
    reason: str,
    detail: str = "",
    media_keys: Sequence[str] = (),
    admission_rate: float,
    observed_rate: float,
    tokens: float,
    priority: str = "",
    controller_mode: str = "",
    capacity_images_per_s: float = 0.0,
    backlog_images: float = 0.0,
    estimated_delay_ms: float = 0.0,
    admitted_images_per_s: float = 0.0,
) -> ShedRecord:
    """The record of `tweet` dropped on purpose, for `reason`, with the rates and the
    admission controller's state at that moment."""
    return ShedRecord(
        tweet_id=tweet["id"],
        reason=reason,
        detail=detail,
        media_keys=list(media_keys),
        admission_rate=float(admission_rate),
        observed_rate=float(observed_rate),
        tokens=float(tokens),
        source=tweet.get("source") or "unknown",
        replay_run_id=tweet.get("replay_run_id"),
        shed_at_ms=now_ms(),
        priority=priority,
        controller_mode=controller_mode,
        capacity_images_per_s=float(capacity_images_per_s),
        backlog_images=float(backlog_images),
        estimated_delay_ms=float(estimated_delay_ms),
        admitted_images_per_s=float(admitted_images_per_s),
    )


# DeadLetter.avsc -----------------------------------------------------------------------


class DeadLetter(TypedDict):
    source_topic: str
    source_partition: int
    source_offset: int
    stage: str
    error_class: str
    message: str
    tweet_id: str | None
    media_key: str | None
    url: str | None
    payload: bytes | None
    failed_at_ms: float


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
) -> DeadLetter:
    """A DeadLetter for `error`, raised while processing the given source record."""
    return DeadLetter(
        source_topic=source_topic,
        source_partition=source_partition,
        source_offset=source_offset,
        stage=stage,
        error_class=type(error).__name__,
        message=str(error)[:2000] or type(error).__name__,
        tweet_id=tweet_id,
        media_key=media_key,
        url=url,
        payload=payload,
        failed_at_ms=now_ms(),
    )


# CapacityReport.avsc -------------------------------------------------------------------


class CapacityReport(TypedDict):
    consumer_id: str
    images_per_s: float
    batch_size: float
    queue_depth: int
    reported_at_ms: float


def capacity_report(
    *, consumer_id: str, images_per_s: float, batch_size: float, queue_depth: int
) -> CapacityReport:
    return CapacityReport(
        consumer_id=consumer_id,
        images_per_s=float(images_per_s),
        batch_size=float(batch_size),
        queue_depth=int(queue_depth),
        reported_at_ms=now_ms(),
    )


#: The TypedDict of each record, by the record name of its schema.
RECORD_TYPES: dict[str, type] = {
    "Tweet": Tweet,
    "ImageEvent": ImageEvent,
    "HashtagResult": HashtagResult,
    "ShedRecord": ShedRecord,
    "DeadLetter": DeadLetter,
    "CapacityReport": CapacityReport,
}
