"""Bluesky posts with images, from Jetstream, as a tweet source (`tagstream produce bluesky`).

Jetstream serves the commits of every Bluesky repository as JSON over a WebSocket:
``wss://<host>/subscribe?wantedCollections=app.bsky.feed.post&cursor=<time_us>``. Each
event is ``{"did", "time_us", "kind", ...}``; ``kind`` is ``commit`` (with ``commit``:
``operation`` create/update/delete, ``collection``, ``rkey``, ``rev``, and for a create or
update the ``record`` and its ``cid``), ``identity`` or ``account``. Jetstream filters
only by collection and DID, so `BlueskySource` keeps what it wants here
(producers/posts.py): posts whose record embeds images (``app.bsky.embed.images``, or
the images of ``app.bsky.embed.recordWithMedia``, a quote post with media) and that match
the tag filter; deletions and edits of the posts it produced.

A post becomes a Tweet record keyed by its AT URI (``at://<did>/app.bsky.feed.post/<rkey>``,
which never collides with an X id or a Mastodon key), with the author's DID, the photos'
URLs as Bluesky's CDN serves them (``<cdn>/img/feed_fullsize/plain/<did>/<cid>@jpeg``,
``feed_thumbnail`` for the preview), their alt texts and aspect ratios, the languages, and
the hashtags of the facets and of the record's ``tags``. A photo's media key is
``<AT URI>#<blob cid>``: an edit that keeps a photo keeps its key.

Resume: each event's position is its ``time_us`` and how many events before it had the
same ``time_us``. Jetstream replays from a cursor, the first event at that time included;
`Jetstream` asks for the last position read on a reconnect and the last one delivered
after a restart, and drops what it had already read, so nothing is lost and nothing read
is produced twice (unless Jetstream replays a given microsecond's events in another order;
a repeat Jetstream sends anyway is dropped by the pump, by post and revision).
``--cursor``/``--since`` win over the saved position.

Compression: tagstream never asks for ``compress=true`` (zstd with Jetstream's own
dictionary); a binary frame that is not JSON is dead-lettered, not decoded.

Delivery guarantee: at-least-once from Jetstream onwards within its retention (a day or
more): the pump saves the position once the event and all before it are delivered, every
second and at a stop, so a restart repeats at most the second before a crash. Frames that
are not events go to `deadletter` (stage ``bluesky``) with their bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from infra import metrics
from infra.exceptions import CodecError, TagstreamError
from infra.record_producer import SourceRef
from producers.posts import Backoff, PostGate, TagFilter, untrusted
from producers.source import Rejected, SourceItem, TweetSource
from schemas.records import Media, Tweet, deletion, media, now_ms, tweet

log = logging.getLogger(__name__)

POST = "app.bsky.feed.post"
IMAGES = "app.bsky.embed.images"
RECORD_WITH_MEDIA = "app.bsky.embed.recordWithMedia"
VIDEO = "app.bsky.embed.video"
TAG_FEATURE = "app.bsky.richtext.facet#tag"

#: Jetstream drops events bigger than this for us (its ``maxMessageSizeBytes``); our
#: WebSocket accepts a little more, so that no event can fail the connection again and
#: again on every reconnect.
MAX_MESSAGE_BYTES = 1_000_000

#: Where Jetstream frames come from, for their dead letters.
JETSTREAM_SOURCE = SourceRef("bluesky-jetstream")

#: Posts (id, operation, revision) remembered to drop a repeat the server sends anyway.
RECENT_POSTS = 50_000


class BlueskyError(TagstreamError):
    """Jetstream refused us in a way that waiting will not fix, or we gave up."""


def at_uri(did: str, rkey: str) -> str:
    """The AT URI of post `rkey` of `did`: the post's id and Kafka key."""
    return f"at://{did}/{POST}/{rkey}"


def post_url(did: str, rkey: str) -> str:
    return f"https://bsky.app/profile/{did}/post/{rkey}"


def photo_url(cdn_url: str, did: str, cid: str, *, size: str = "feed_fullsize") -> str:
    """Where Bluesky's CDN serves blob `cid` of `did` as a JPEG (``feed_thumbnail``:
    the small one)."""
    return f"{cdn_url.rstrip('/')}/img/{size}/plain/{did}/{cid}@jpeg"


def since_cursor(when: datetime) -> int:
    """A Jetstream cursor (epoch microseconds) for a time."""
    return int(when.timestamp() * 1_000_000)


def _need(obj: Any, field: str, kind: type, where: str) -> Any:
    """``obj[field]`` when it is a `kind` (a non-empty one for str); else CodecError."""
    value = obj.get(field) if isinstance(obj, dict) else None
    if isinstance(value, kind) and not isinstance(value, bool) and (value or kind is not str):
        return value
    wanted = "a non-empty string" if kind is str else f"a {kind.__name__}"
    raise CodecError(f"{where}: {field!r} must be {wanted}, got {type(value).__name__}")


def skip_reason(event: dict[str, Any]) -> str | None:
    """Why an event is no post to look at (another kind or collection), or None."""
    kind = event.get("kind")
    if kind != "commit":
        return f"{kind}_event" if kind in ("identity", "account") else "other_event"
    commit = event.get("commit")
    if isinstance(commit, dict) and commit.get("collection") != POST:
        return "other_collection"
    return None


def _images(embed: Any, where: str) -> list[dict[str, Any]]:
    """The image entries of an embed (its images, or those of a quote post's media); []
    for an embed of anything else (a link card, a video, a quote without media)."""
    if not isinstance(embed, dict):
        return []
    kind = embed.get("$type")
    if kind == RECORD_WITH_MEDIA:
        return _images(embed.get("media"), f"{where}, quoted media")
    if kind != IMAGES:
        return []
    images = embed.get("images")
    if not isinstance(images, list):
        raise CodecError(f"{where}: 'embed.images' must be a list")
    return images


def _blob_cid(image: Any, where: str) -> str:
    blob = image.get("image") if isinstance(image, dict) else None
    if not isinstance(blob, dict):
        raise CodecError(f"{where}: an image without an 'image' blob")
    ref = blob.get("ref")
    # Blobs are {"$type": "blob", "ref": {"$link": cid}, ...}; early records had {"cid"}.
    cid = ref.get("$link") if isinstance(ref, dict) else blob.get("cid")
    if not isinstance(cid, str) or not cid:
        raise CodecError(f"{where}: an image blob without a cid")
    return cid


def _media(record: dict[str, Any], uri: str, did: str, cdn_url: str, where: str) -> list[Media]:
    embed = record.get("embed")
    found: list[Media] = []
    seen: set[str] = set()
    for image in _images(embed, where):
        cid = _blob_cid(image, where)
        if cid in seen:
            continue
        seen.add(cid)
        ratio = image.get("aspectRatio")
        width = ratio.get("width") if isinstance(ratio, dict) else None
        height = ratio.get("height") if isinstance(ratio, dict) else None
        alt = image.get("alt")
        found.append(
            media(
                media_key=f"{uri}#{cid}",
                type="photo",
                url=photo_url(cdn_url, did, cid),
                preview_image_url=photo_url(cdn_url, did, cid, size="feed_thumbnail"),
                width=width if isinstance(width, int) and not isinstance(width, bool) else None,
                height=height if isinstance(height, int) and not isinstance(height, bool) else None,
                alt_text=alt if isinstance(alt, str) and alt else None,
            )
        )
    if not found and isinstance(embed, dict):
        inner = embed.get("media") if embed.get("$type") == RECORD_WITH_MEDIA else embed
        if isinstance(inner, dict) and inner.get("$type") == VIDEO:
            found.append(media(media_key=f"{uri}#video", type="video"))
    return found


def _tags(record: dict[str, Any]) -> list[str]:
    tags: list[str] = []
    facets = record.get("facets")
    for facet in facets if isinstance(facets, list) else []:
        features = facet.get("features") if isinstance(facet, dict) else None
        for feature in features if isinstance(features, list) else []:
            if isinstance(feature, dict) and feature.get("$type") == TAG_FEATURE:
                if isinstance(feature.get("tag"), str) and feature["tag"]:
                    tags.append(feature["tag"])
    extra = record.get("tags")  # hashtags not in the text
    if isinstance(extra, list):
        tags.extend(t for t in extra if isinstance(t, str) and t)
    return list(dict.fromkeys(tags))


@untrusted
def tweet_from_event(
    event: dict[str, Any],
    *,
    cdn_url: str,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet record of a Jetstream commit on ``app.bsky.feed.post``: the post (create
    or update, with or without photos) or its deletion. Raises `CodecError` for an event
    that is not one (see `skip_reason` for the events to leave out first)."""
    did = _need(event, "did", str, "event")
    commit = _need(event, "commit", dict, "event")
    rkey = _need(commit, "rkey", str, "commit")
    uri = at_uri(did, rkey)
    operation = commit.get("operation")
    revision = commit.get("rev") if isinstance(commit.get("rev"), str) else None
    if operation == "delete":
        return deletion(
            id=uri,
            network="bluesky",
            source=source,
            ingested_at_ms=ingested_at_ms,
            post_id=uri,
            author_id=did,
            revision=revision,
            replay_run_id=replay_run_id,
        )
    if operation not in ("create", "update"):
        raise CodecError(f"{uri}: unknown operation {operation!r:.40}")
    where = uri
    record = _need(commit, "record", dict, where)
    text = record.get("text")
    if not isinstance(text, str):
        raise CodecError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    langs = record.get("langs")
    created = record.get("createdAt")
    return tweet(
        id=uri,
        text=text,
        source=source,
        ingested_at_ms=ingested_at_ms,
        author_id=did,
        created_at=created if isinstance(created, str) else None,
        media=_media(record, uri, did, cdn_url, where),
        replay_run_id=replay_run_id,
        network="bluesky",
        post_id=uri,
        post_url=post_url(did, rkey),
        langs=[x for x in langs if isinstance(x, str)] if isinstance(langs, list) else [],
        tags=_tags(record),
        operation=operation,
        revision=revision,
    )


@untrusted
def tweet_from_archived(
    line: dict[str, Any],
    *,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet of an archived line of `BlueskySource` (``{"event", "cdn",
    "matching_rules"}``), as it was produced: replay reads archives with this."""
    event = _need(line, "event", dict, "archived bluesky line")
    cdn_url = _need(line, "cdn", str, "archived bluesky line")
    post = tweet_from_event(
        event,
        cdn_url=cdn_url,
        source=source,
        ingested_at_ms=ingested_at_ms,
        replay_run_id=replay_run_id,
    )
    rules = line.get("matching_rules") or []
    if not isinstance(rules, list) or not all(
        isinstance(r, dict) and isinstance(r.get("id"), str) for r in rules
    ):
        raise CodecError("archived bluesky line: 'matching_rules' must be a list of rules")
    post["matching_rules"] = [{"id": r["id"], "tag": r.get("tag")} for r in rules]
    return post


# The client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame read: its event (None when it is not one, with `error`), the frame as
    read, and its position (``[time_us, n]``: the n-th event at that time; None without
    a time)."""

    raw: str | bytes
    event: dict[str, Any] | None
    position: list[int] | None
    error: str = ""


class _Reconnect(Exception):
    """Internal: end this connection and reconnect after a back-off."""


class _Here:
    """Where a connection is: the time of its last event and how many it had at that time."""

    time_us: int | None = None
    n: int = 0


class Jetstream:
    """A reconnecting Jetstream client: `frames()` yields every frame, once.

    `cursor` is where to start (``[time_us, n]``: after the first n events at `time_us`;
    None: live). After each frame it is that frame's position; a reconnect asks Jetstream
    for it and drops the frames it had already read. Back-off after a failure: 1 s,
    doubling, at most 60 s (Jetstream documents none), reset by the next frame; a 4xx
    answer other than 429 stops with `BlueskyError`. `counters` counts connections,
    frames, replays dropped and failures by kind; `backoffs` holds every delay slept.
    """

    def __init__(
        self,
        *,
        url: str,
        cursor: Sequence[int] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        idle_timeout_s: float = 60.0,
        open_timeout_s: float = 10.0,
        max_reconnects: int | None = None,
    ) -> None:
        self.url = url
        self.cursor: list[int] | None = None if cursor is None else [int(c) for c in cursor]
        self._sleep = sleep
        self.idle_timeout_s = idle_timeout_s
        self.open_timeout_s = open_timeout_s
        self.max_reconnects = max_reconnects
        self.counters: Counter[str] = Counter()
        self.backoffs: list[float] = []
        self._backoff = Backoff(1.0, 60.0)

    def subscribe_url(self) -> str:
        """The URL of the next connection: posts only, from the cursor."""
        params = {"wantedCollections": POST, "maxMessageSizeBytes": str(MAX_MESSAGE_BYTES)}
        if self.cursor is not None:
            params["cursor"] = str(self.cursor[0])
        return f"{self.url}{'&' if '?' in self.url else '?'}{urlencode(params)}"

    async def frames(self) -> AsyncIterator[Frame]:
        reconnects = 0
        while True:
            try:
                async with contextlib.aclosing(self._one_connection()) as frames:
                    async for frame in frames:
                        yield frame
            except _Reconnect as failure:
                if self.max_reconnects is not None and reconnects >= self.max_reconnects:
                    raise BlueskyError(
                        f"gave up after {reconnects} reconnects; last: {failure}"
                    ) from None
                reconnects += 1
                self.counters["reconnects"] += 1
                delay = self._backoff.next()
                self.backoffs.append(delay)
                log.warning("Jetstream: %s; reconnecting in %.1f s", failure, delay)
                metrics.SOURCE_RECONNECTS.labels(source="bluesky").inc()
                metrics.SOURCE_BACKOFF.labels(source="bluesky").inc(delay)
                await self._sleep(delay)

    async def _one_connection(self) -> AsyncIterator[Frame]:
        resume = self.cursor
        here = _Here()
        try:
            async with connect(
                self.subscribe_url(),
                open_timeout=self.open_timeout_s,
                max_size=MAX_MESSAGE_BYTES + 65536,
                user_agent_header="tagstream",
            ) as ws:
                self.counters["connections"] += 1
                while True:
                    try:
                        message = await asyncio.wait_for(ws.recv(), self.idle_timeout_s)
                    except TimeoutError:
                        self.counters["stalls"] += 1
                        raise _Reconnect(f"nothing for {self.idle_timeout_s:g} s") from None
                    frame = self._frame(message, here)
                    if frame.position is not None and resume is not None:
                        if frame.position <= resume:
                            # Read before: the replay of a reconnect or a restart.
                            self.counters["replayed"] += 1
                            continue
                        resume = None  # caught up: every frame from here on is new
                    if frame.position is not None:
                        self.cursor = frame.position
                    self._backoff.reset()
                    yield frame
        except InvalidStatus as e:
            status = e.response.status_code
            self.counters[f"http_{status}"] += 1
            if 400 <= status < 500 and status != 429:
                raise BlueskyError(f"Jetstream refused the subscription: HTTP {status}") from None
            raise _Reconnect(f"HTTP {status}") from None
        except ConnectionClosed as e:
            self.counters["closed"] += 1
            code = e.rcvd.code if e.rcvd is not None else "no close frame"
            raise _Reconnect(f"connection closed ({code})") from None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            self.counters["network_errors"] += 1
            raise _Reconnect(f"{type(e).__name__}: {e}") from None

    def _frame(self, message: str | bytes, here: _Here) -> Frame:
        """The frame of `message`, positioned after the frames before it on `here`."""
        self.counters["frames"] += 1
        try:
            event = json.loads(message)
        except ValueError as e:
            self.counters["malformed"] += 1
            detail = "binary frame that is not JSON (zstd is never asked for)"
            error = detail if isinstance(message, bytes) else f"not JSON: {e}"
            return Frame(message, None, None, error[:500])
        time_us = event.get("time_us") if isinstance(event, dict) else None
        if not isinstance(time_us, int) or isinstance(time_us, bool):
            self.counters["malformed"] += 1
            return Frame(message, None, None, "not a Jetstream event: no integer 'time_us'")
        here.n = here.n + 1 if here.time_us == time_us else 1
        here.time_us = time_us
        return Frame(message, event, [time_us, here.n])


# The source ----------------------------------------------------------------------------


class BlueskySource(TweetSource):
    """Image posts from `Jetstream` that pass the `PostGate` (module docstring)."""

    name = "bluesky"
    dead_letter_stage = "bluesky"
    repeats = RECENT_POSTS
    archive_format = "bluesky"

    def __init__(self, stream: Jetstream, *, tags: TagFilter, cdn_url: str) -> None:
        self.stream = stream
        self.gate = PostGate(tags)
        self.cdn_url = cdn_url.rstrip("/")
        # An explicit --cursor/--since wins over a saved position.
        self._explicit_start = stream.cursor is not None

    def start_after(self, position: Any) -> None:
        if self._explicit_start:
            log.info("bluesky: starting at the given cursor, not at the saved %s", position)
            return
        if isinstance(position, int):  # a bare time_us: from that microsecond on
            position = [position, 0]
        if not (
            isinstance(position, list)
            and len(position) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) for p in position)
        ):
            raise BlueskyError(f"saved position {position!r:.80} is not [time_us, n]")
        self.stream.cursor = list(position)

    async def items(self) -> AsyncIterator[SourceItem]:
        async with contextlib.aclosing(self.stream.frames()) as frames:
            async for frame in frames:
                yield self._item(frame)

    def _item(self, frame: Frame) -> SourceItem:
        raw = frame.raw.encode() if isinstance(frame.raw, str) else frame.raw
        if frame.event is None:
            rejected = Rejected(raw, frame.error, JETSTREAM_SOURCE)
            return SourceItem(rejected=rejected, position=frame.position, raw=frame.raw)
        reason = skip_reason(frame.event)
        if reason is not None:
            return SourceItem(skipped=reason, position=frame.position)
        try:
            post = tweet_from_event(
                frame.event, cdn_url=self.cdn_url, source=self.name, ingested_at_ms=now_ms()
            )
        except CodecError as e:  # untrusted input: a dead letter, never the source's end
            rejected = Rejected(raw, str(e), JETSTREAM_SOURCE)
            return SourceItem(rejected=rejected, position=frame.position, raw=frame.event)
        envelope = {"event": frame.event, "cdn": self.cdn_url}
        return self.gate.item(post, raw=envelope, position=frame.position)
