"""Mastodon posts with images, from an instance's streaming API, as a tweet source
(`tagstream produce mastodon`).

The streaming API sends server-sent events: ``GET /api/v1/streaming/public`` (or
``public/local``) for the instance's federated (or local) timeline,
``/api/v1/streaming/hashtag?tag=cat`` for one hashtag. Each event is ``event: update``
(a new status, JSON), ``status.update`` (an edited status), ``delete`` (a status id) or
another kind left out here; lines starting with ``:`` are heartbeats. The streaming
server may live on another host: its base URL is read from the instance
(``/api/v2/instance``: ``configuration.urls.streaming``, else ``/api/v1/instance``:
``urls.streaming_api``; else the instance itself).

`MastodonSource` reads one stream per hashtag of its tags (``cats`` reads ``#cat`` and
``#cats``), or without tags the public timeline (``only_media=true``: the server leaves
out posts without media), and keeps (producers/posts.py) statuses
with an image attachment (``media_attachments`` of type ``image``) that are not boosts,
the edits of the posts it produced and their deletions. A status becomes a Tweet keyed
``mastodon:<host>:<status id>`` (the id of the instance we read, which is what its
deletions name; never an X id or an AT URI), with its text (the HTML made plain), the
author's account URI, the post's URL, language and hashtags, and each image's URL,
preview, size and description (alt text). The same post read from two hashtag streams is
produced once (the pump drops the repeat).

Authentication: since Mastodon 4.2 the public and hashtag streams need a user token
with the ``read:statuses`` scope; older instances and other servers may serve them
without one. Without a token the source asks without one, and where the instance answers
401 it stops with a clear error asking for ``--token`` (or ``TAGSTREAM_MASTODON_TOKEN``).
A token is sent only as the Authorization header and is never logged or shown.

Reconnects: the instance's own rules first: a ``retry:`` field of the stream sets the
delay after a drop, and a 429 waits for ``Retry-After`` or ``X-RateLimit-Reset``. Else
network errors and silent connections (no heartbeat for `heartbeat_timeout_s`) back off
from 1 s and 5xx answers from 5 s, doubling, to at most 60 s and 320 s.

Delivery guarantee: at-least-once for what the stream sends while connected. The
streaming API cannot resume: statuses sent during a reconnect, or while the process is
down, are not seen (``--archive DIR`` keeps what was read). Events whose data is not what
their kind says go to `deadletter` (stage ``mastodon``) with their bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import html
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import SecretStr

from infra import metrics
from infra.exceptions import CodecError, ConfigurationError, TagstreamError
from infra.record_producer import SourceRef
from producers.posts import Backoff, PostGate, TagFilter, untrusted
from producers.source import Rejected, SourceItem, TweetSource
from schemas.records import Media, Tweet, deletion, media, now_ms, tweet

log = logging.getLogger(__name__)

STREAMING_PATH = "/api/v1/streaming"

#: Attachment types as Tweet media types: only images are photos the pipeline fetches.
MEDIA_TYPES = {"image": "photo", "gifv": "animated_gif", "video": "video", "audio": "audio"}

#: Posts (id, operation, revision) remembered to drop the same post read from two streams.
RECENT_POSTS = 50_000

#: A wait longer than this from a rate-limit header is not trusted (clock skew, a proxy).
RATE_LIMIT_MAX_S = 3600.0

#: Seconds a connection must have lived for its drop to restart the back-off.
STABLE_S = 60.0

#: Events queued between the streams' readers and the source.
QUEUE_SIZE = 1000

#: An event bigger than this is not a status; the buffer is cut rather than grown forever.
MAX_EVENT_BYTES = 4_000_000


class MastodonError(TagstreamError):
    """The instance refused us in a way that waiting will not fix."""


def status_key(host: str, status_id: str) -> str:
    """The Tweet id (and Kafka key) of status `status_id` read from instance `host`."""
    return f"mastodon:{host}:{status_id}"


def instance_host(instance: str) -> str:
    """The host (and port) of an instance URL or bare host name, lower-cased."""
    parts = urlsplit(instance if "//" in instance else f"https://{instance}")
    if not parts.netloc:
        raise ConfigurationError(f"instance {instance!r}: expected a URL like https://host")
    return parts.netloc.lower()


class _Text(HTMLParser):
    """A status's HTML as plain text: paragraphs and line breaks become new lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.parts.append("\n")
        elif tag == "p" and self.parts:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def plain_text(content: str) -> str:
    """The text of a status's HTML ``content``, entities decoded."""
    parser = _Text()
    parser.feed(content)
    parser.close()
    return html.unescape("".join(parser.parts)).strip()


def _opt_str(obj: dict[str, Any], field: str) -> str | None:
    value = obj.get(field)
    return value if isinstance(value, str) and value else None


def _size(attachment: dict[str, Any]) -> tuple[int | None, int | None]:
    meta = attachment.get("meta")
    original = meta.get("original") if isinstance(meta, dict) else None
    if not isinstance(original, dict):
        return None, None
    sizes = [original.get("width"), original.get("height")]
    ok = [v if isinstance(v, int) and not isinstance(v, bool) else None for v in sizes]
    return ok[0], ok[1]


def _media(status: dict[str, Any], host: str, where: str) -> list[Media]:
    attachments = status.get("media_attachments") or []
    if not isinstance(attachments, list):
        raise CodecError(f"{where}: 'media_attachments' must be a list")
    found: list[Media] = []
    for attachment in attachments:
        if not isinstance(attachment, dict) or not isinstance(attachment.get("id"), str):
            raise CodecError(f"{where}: every media attachment needs a string 'id'")
        kind = MEDIA_TYPES.get(str(attachment.get("type")), "unknown")
        width, height = _size(attachment)
        found.append(
            media(
                media_key=status_key(host, attachment["id"]),
                type=kind,
                # Only images are fetched; a remote attachment not yet cached has no url.
                url=_opt_str(attachment, "url") if kind == "photo" else None,
                preview_image_url=_opt_str(attachment, "preview_url"),
                width=width,
                height=height,
                alt_text=_opt_str(attachment, "description"),
            )
        )
    return found


def tweet_from_status(
    status: Any,
    *,
    host: str,
    operation: str,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet record of a Mastodon status read from instance `host` (`operation`:
    ``create`` for an ``update`` event, ``update`` for a ``status.update``). Raises
    `CodecError` for what is not a status."""
    if not isinstance(status, dict):
        raise CodecError(f"a status must be a JSON object, got {type(status).__name__}")
    status_id = status.get("id")
    if not isinstance(status_id, str) or not status_id:
        raise CodecError(f"status without a string 'id' (got {status_id!r:.40})")
    where = f"status {status_id}"
    content = status.get("content")
    if not isinstance(content, str):
        raise CodecError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    account = status.get("account")
    if not isinstance(account, dict):
        raise CodecError(f"{where}: 'account' must be an object")
    tags = status.get("tags") or []
    if not isinstance(tags, list):
        raise CodecError(f"{where}: 'tags' must be a list")
    language = _opt_str(status, "language")
    return tweet(
        id=status_key(host, status_id),
        text=plain_text(content),
        source=source,
        ingested_at_ms=ingested_at_ms,
        author_id=_opt_str(account, "uri") or _opt_str(account, "url") or _opt_str(account, "id"),
        created_at=_opt_str(status, "created_at"),
        media=_media(status, host, where),
        replay_run_id=replay_run_id,
        network="mastodon",
        post_id=status_id,
        post_url=_opt_str(status, "url") or _opt_str(status, "uri"),
        langs=[language] if language else [],
        tags=[t["name"] for t in tags if isinstance(t, dict) and isinstance(t.get("name"), str)],
        operation=operation,
        revision=_opt_str(status, "edited_at"),
    )


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event of a stream: its kind and its data as sent."""

    stream: str  # e.g. hashtag:cat, public
    kind: str
    data: str


#: The Tweet operation of each event kind that carries one.
OPERATIONS = {"update": "create", "status.update": "update", "delete": "delete"}


@untrusted
def tweet_from_event(
    event: Event,
    *,
    host: str,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet of an ``update``, ``status.update`` or ``delete`` event of instance
    `host`'s stream. Raises `CodecError` for data that is not what its kind says."""
    operation = OPERATIONS.get(event.kind)
    if operation is None:
        raise CodecError(f"event {event.kind!r:.40} carries no status")
    if operation == "delete":
        status_id = event.data.strip()
        if not status_id or any(c.isspace() for c in status_id) or len(status_id) > 100:
            raise CodecError(f"delete event without a status id (got {event.data!r:.40})")
        key = status_key(host, status_id)
        return deletion(
            id=key,
            network="mastodon",
            source=source,
            ingested_at_ms=ingested_at_ms,
            post_id=status_id,
            replay_run_id=replay_run_id,
        )
    try:
        status = json.loads(event.data)
    except ValueError as e:
        raise CodecError(f"{event.kind} event whose data is not JSON: {e}") from None
    return tweet_from_status(
        status,
        host=host,
        operation=operation,
        source=source,
        ingested_at_ms=ingested_at_ms,
        replay_run_id=replay_run_id,
    )


@untrusted
def tweet_from_archived(
    line: dict[str, Any],
    *,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
) -> Tweet:
    """The Tweet of an archived line of `MastodonSource` (``{"host", "stream", "event",
    "data", "matching_rules"}``), as it was produced: replay reads archives with this."""
    fields = [line.get(k) for k in ("host", "stream", "event", "data")]
    if not all(isinstance(f, str) for f in fields):
        raise CodecError("archived mastodon line: needs string 'host', 'stream', 'event', 'data'")
    host, stream, kind, data = fields
    post = tweet_from_event(
        Event(stream, kind, data),
        host=host,
        source=source,
        ingested_at_ms=ingested_at_ms,
        replay_run_id=replay_run_id,
    )
    rules = line.get("matching_rules") or []
    if not isinstance(rules, list) or not all(
        isinstance(r, dict) and isinstance(r.get("id"), str) for r in rules
    ):
        raise CodecError("archived mastodon line: 'matching_rules' must be a list of rules")
    post["matching_rules"] = [{"id": r["id"], "tag": r.get("tag")} for r in rules]
    return post


# The client ----------------------------------------------------------------------------


class _Reconnect(Exception):
    """Internal: end this connection and reconnect after the back-off of `kind`, or
    after `wait_s` when the instance said how long."""

    def __init__(self, reason: str, *, kind: str, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.wait_s = wait_s


def _retry_after(headers: Any, now: float) -> float | None:
    """Seconds a 429 asks us to wait: ``Retry-After`` (seconds or an HTTP date), else
    Mastodon's ``X-RateLimit-Reset`` (an ISO 8601 time)."""
    value = headers.get("Retry-After")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value))
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    value = headers.get("X-RateLimit-Reset")
    if value:
        with contextlib.suppress(ValueError):
            reset = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return max(0.0, reset.timestamp() - now)
    return None


class MastodonStreams:
    """Reconnecting readers of one instance's streams (`streams`: ``public``,
    ``public/local`` or ``hashtag:<tag>``); `events()` yields their events, merged.

    `counters` counts connections, events, heartbeats and failures by kind; `backoffs`
    holds every delay slept before a reconnect.
    """

    def __init__(
        self,
        *,
        instance: str,
        streams: list[str],
        token: SecretStr | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        heartbeat_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        max_reconnects: int | None = None,
    ) -> None:
        if token is not None and not isinstance(token, SecretStr):
            raise TypeError("token must be a pydantic SecretStr")
        if not streams:
            raise ValueError("no stream to read")
        self.instance = instance if "//" in instance else f"https://{instance}"
        self.instance = self.instance.rstrip("/")
        self.host = instance_host(instance)
        self.streams = streams
        self._token = token
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_reconnects = max_reconnects
        self.counters: Counter[str] = Counter()
        self.backoffs: list[float] = []
        self.streaming_url: str | None = None

    def __repr__(self) -> str:
        token = "SecretStr('**********')" if self._token is not None else "None"
        return f"MastodonStreams(instance={self.instance!r}, token={token})"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "User-Agent": "tagstream"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        return headers

    async def discover(self, session: aiohttp.ClientSession) -> str:
        """The streaming server's base URL, as the instance names it (else the instance)."""
        for path, keys in (
            ("/api/v2/instance", ("configuration", "urls", "streaming")),
            ("/api/v1/instance", ("urls", "streaming_api")),
        ):
            try:
                async with session.get(self.instance + path) as response:
                    if response.status != 200:
                        continue
                    value: Any = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, str) and value.startswith(("wss://", "ws://", "https://")):
                return value.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
        return self.instance

    async def events(self) -> AsyncIterator[Event | BaseException]:
        """Every stream's events, merged; a reader that cannot go on puts its error in."""
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue(QUEUE_SIZE)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.streaming_url = (await self.discover(session)).rstrip("/")
            readers = [
                asyncio.create_task(self._read(session, stream, queue)) for stream in self.streams
            ]
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)

    async def _read(
        self, session: aiohttp.ClientSession, stream: str, queue: asyncio.Queue
    ) -> None:
        schedules = {
            "network": Backoff(1.0, 60.0),
            "http": Backoff(5.0, 320.0),
            "rate_limit": Backoff(60.0, 960.0),
        }
        reconnects = 0
        retry_s: float | None = None  # the stream's own `retry:`
        try:
            while True:
                opened: float | None = None
                try:
                    async for what, value in self._one_connection(session, stream):
                        if what == "open":
                            opened = self._clock()
                        elif what == "retry":
                            retry_s = value
                        else:
                            for schedule in schedules.values():
                                schedule.reset()
                            await queue.put(Event(stream, *value))
                except _Reconnect as failure:
                    if self.max_reconnects is not None and reconnects >= self.max_reconnects:
                        raise MastodonError(
                            f"{stream}: gave up after {reconnects} reconnects; last: {failure}"
                        ) from None
                    reconnects += 1
                    self.counters["reconnects"] += 1
                    if opened is not None and self._clock() - opened >= STABLE_S:
                        # A quiet stream that lived a while before it dropped: no penalty.
                        for schedule in schedules.values():
                            schedule.reset()
                    delay = schedules[failure.kind].next()
                    if failure.wait_s is not None:  # the instance said how long
                        delay = min(failure.wait_s, RATE_LIMIT_MAX_S)
                    elif failure.kind == "network" and retry_s is not None:
                        delay = retry_s
                    self.backoffs.append(delay)
                    log.warning("mastodon %s: %s; reconnecting in %.1f s", stream, failure, delay)
                    metrics.SOURCE_RECONNECTS.labels(source="mastodon").inc()
                    metrics.SOURCE_BACKOFF.labels(source="mastodon").inc(delay)
                    await self._sleep(delay)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the source raises it, so the process stops clearly
            await queue.put(e)

    def _url(self, stream: str) -> tuple[str, dict[str, str]]:
        if stream.startswith("hashtag:"):
            return f"{self.streaming_url}{STREAMING_PATH}/hashtag", {"tag": stream[8:]}
        # Public timelines can leave out what has no media on the server's side.
        return f"{self.streaming_url}{STREAMING_PATH}/{stream}", {"only_media": "true"}

    async def _one_connection(
        self, session: aiohttp.ClientSession, stream: str
    ) -> AsyncIterator[tuple[str, Any]]:
        """``("open", None)`` once connected, then ``("event", (kind, data))`` per event
        and ``("retry", seconds)`` per ``retry:`` field."""
        url, params = self._url(stream)
        try:
            response = await session.get(url, params=params, headers=self._headers())
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self.counters["network_errors"] += 1
            raise _Reconnect(f"connect failed: {type(e).__name__}", kind="network") from None
        async with response:
            if response.status != 200:
                self._refuse(response, stream)
            self.counters["connections"] += 1
            yield "open", None
            async for event in self._events(response):
                yield event

    def _refuse(self, response: aiohttp.ClientResponse, stream: str) -> None:
        status = response.status
        self.counters[f"http_{status}"] += 1
        if status == 401 and self._token is None:
            raise MastodonError(
                f"{self.host} needs an access token for the {stream} stream (Mastodon 4.2 "
                "and later): give --token or set TAGSTREAM_MASTODON_TOKEN (a user token "
                "with the read:statuses scope)"
            )
        if status in (401, 403):
            raise MastodonError(f"{self.host} refused the token for the {stream} stream")
        if status == 429:
            wait_s = _retry_after(response.headers, self._wall_clock())
            raise _Reconnect("HTTP 429 (rate limited)", kind="rate_limit", wait_s=wait_s)
        if 400 <= status < 500:
            raise MastodonError(f"{self.host}: the {stream} stream answered HTTP {status}")
        raise _Reconnect(f"HTTP {status}", kind="http")

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
        kind, data = "", []
        buffer = b""
        while True:
            try:
                chunk = await asyncio.wait_for(response.content.readany(), self.heartbeat_timeout_s)
            except TimeoutError:
                self.counters["stalls"] += 1
                raise _Reconnect(
                    f"no heartbeat for {self.heartbeat_timeout_s:g} s", kind="network"
                ) from None
            except (aiohttp.ClientError, OSError) as e:
                self.counters["network_errors"] += 1
                raise _Reconnect(f"connection lost: {type(e).__name__}", kind="network") from None
            if not chunk:
                raise _Reconnect("connection closed", kind="network")
            buffer += chunk
            if len(buffer) > MAX_EVENT_BYTES:
                self.counters["oversized"] += 1
                raise _Reconnect("an event over the size limit", kind="network")
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if not line:  # the end of an event
                    if data:
                        self.counters["events"] += 1
                        yield "event", (kind or "message", "\n".join(data))
                    kind, data = "", []
                elif line.startswith(":"):
                    self.counters["heartbeats"] += 1
                else:
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        kind = value
                    elif field == "data":
                        data.append(value)
                    elif field == "retry" and value.isdigit():
                        yield "retry", int(value) / 1000.0


# The source ----------------------------------------------------------------------------


#: Where stream events come from, for their dead letters.
def _source_ref(host: str, stream: str) -> SourceRef:
    return SourceRef(f"mastodon:{host}/{stream}")


class MastodonSource(TweetSource):
    """Image posts from an instance's `MastodonStreams` that pass the `PostGate`."""

    name = "mastodon"
    dead_letter_stage = "mastodon"
    repeats = RECENT_POSTS
    archive_format = "mastodon"

    def __init__(self, streams: MastodonStreams, *, tags: TagFilter) -> None:
        self.streams = streams
        self.gate = PostGate(tags)

    async def items(self) -> AsyncIterator[SourceItem]:
        async with contextlib.aclosing(self.streams.events()) as events:
            async for event in events:
                assert isinstance(event, Event)
                yield self._item(event)

    def _item(self, event: Event) -> SourceItem:
        host = self.streams.host
        if event.kind not in OPERATIONS:
            return SourceItem(skipped="other_event")
        envelope = {"host": host, "stream": event.stream, "event": event.kind, "data": event.data}
        try:
            post = tweet_from_event(event, host=host, source=self.name, ingested_at_ms=now_ms())
        except CodecError as e:  # untrusted input: a dead letter, never the source's end
            where = _source_ref(host, event.stream)
            return SourceItem(rejected=Rejected(event.data.encode(), str(e), where), raw=envelope)
        # A boost has no attachments of its own (they are the boosted post's), so the
        # gate skips it as a post without an image.
        return self.gate.item(post, raw=envelope)


def streams_for(tags: TagFilter, *, local: bool = False) -> list[str]:
    """The streams to read: one per hashtag of the filter, else the public timeline."""
    hashtags = tags.hashtags()
    if hashtags:
        return [f"hashtag:{h}" for h in hashtags]
    return ["public/local" if local else "public"]
