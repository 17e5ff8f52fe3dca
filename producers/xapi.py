"""The X API v2 filtered stream: rule management, a reconnecting reader, and the producer.

`FilteredStream` is an aiohttp client of ``/2/tweets/search/stream`` and its rules. Its
`stream_lines()` never gives up on its own (unless `max_reconnects` says so): it follows
the documented back-off, linear +250 ms up to 16 s for network errors and stalls (nothing,
not even a keep-alive, for `keepalive_timeout_s`), exponential from 5 s up to 320 s for
HTTP errors and in-stream error objects, and exponential from 60 s for 429, waiting for
``x-rate-limit-reset`` when that is later.

`XStreamSource` is the stream as a tweet source (producers/source.py) and
`run_twitter_producer` syncs the rules and pumps it onto `tweets`. Delivery is
at-least-once from the stream's point of view: the Kafka producer is idempotent, so its
own retries never duplicate, but a reconnect may replay tweets the API already sent.
Tweet ids are the record keys and the pump's bounded memory of recent ids drops the
replays it sees, so duplicates can only come from a restart of the process. Lines that
are not tweets go to `deadletter` with their bytes; nothing read from the stream is
dropped silently.

The bearer token lives in a `SecretStr` and is unwrapped only to build the Authorization
header of a request: it is never logged, never put in an exception message, never in a
repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import SecretStr

from infra import metrics
from infra.exceptions import CodecError, ConfigurationError, TagstreamError
from infra.record_producer import SourceRef
from infra.settings import Settings
from producers.posts import default_classes, singular, tag_words
from producers.source import Rejected, SourceItem, TweetSource, run_source
from producers.tweets import tweet_from_stream_line
from schemas.records import now_ms

if TYPE_CHECKING:
    from producers.archive import StreamArchive

log = logging.getLogger(__name__)

RULES_PATH = "/2/tweets/search/stream/rules"
STREAM_PATH = "/2/tweets/search/stream"

#: What each stream line carries: the photos' urls come back under ``includes.media``.
STREAM_PARAMS = {
    "expansions": "attachments.media_keys",
    "media.fields": "media_key,type,url,preview_image_url,width,height,alt_text",
    "tweet.fields": "created_at,author_id,attachments",
}

# The back-off schedule X documents for the filtered stream (docs/sources.md).
NETWORK_STEP_S = 0.25
NETWORK_MAX_S = 16.0
HTTP_FIRST_S = 5.0
HTTP_MAX_S = 320.0
RATE_LIMIT_FIRST_S = 60.0
#: The API gives no ceiling for 429; 15 min is its rate-limit window, so doubling past
#: it only adds waiting.
RATE_LIMIT_MAX_S = 960.0
#: A reset header further ahead than this is not trusted (clock skew, a bad proxy).
RATE_LIMIT_RESET_MAX_S = 3600.0

#: Statuses that no waiting will fix: a bad token, a bad request, a missing endpoint.
FATAL_STATUSES = frozenset({400, 401, 403, 404})

#: A line longer than this is not a tweet; the buffer is cut rather than grown forever.
MAX_LINE_BYTES = 4_000_000


class XApiError(TagstreamError):
    """The X API refused a request in a way that waiting will not fix, or we gave up."""


@dataclass(frozen=True)
class MalformedLine:
    """A stream line that is not a JSON object; the caller dead-letters its bytes."""

    raw: bytes
    error: str


class _Reconnect(Exception):
    """Internal: end this connection and reconnect after the back-off of `kind`."""

    def __init__(self, kind: str, reason: str, *, reset_at: float | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.reset_at = reset_at


def require_secret(bearer_token: object) -> SecretStr:
    """`bearer_token` if it is a `SecretStr`; a plain str would end up in reprs and
    tracebacks' locals, so it is refused early."""
    if not isinstance(bearer_token, SecretStr):
        raise TypeError("bearer_token must be a pydantic SecretStr")
    return bearer_token


def require_token(settings: Settings) -> SecretStr:
    """The configured bearer token; a clear error when there is none."""
    token = settings.x_bearer_token
    if token is None or not token.get_secret_value():
        raise ConfigurationError("TAGSTREAM_X_BEARER_TOKEN is not set: the X API needs it")
    return token


def bearer_headers(bearer_token: SecretStr) -> dict[str, str]:
    """The Authorization header of one request: the only place the token is unwrapped."""
    return {"Authorization": f"Bearer {bearer_token.get_secret_value()}"}


def redact(text: str, bearer_token: SecretStr) -> str:
    """`text` without the token, for anything that may echo a request back."""
    secret = bearer_token.get_secret_value()
    return text.replace(secret, "**********") if secret else text


class XApiClient:
    """What every X API client here shares: the base URL, the token kept secret (also in
    the repr), one aiohttp session opened on first use, and `close()` / ``async with``.

    Subclasses say how their session is made (`_new_session`)."""

    def __init__(self, *, base_url: str, bearer_token: SecretStr) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = require_secret(bearer_token)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            "bearer_token=SecretStr('**********'))"
        )

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _new_session(self) -> aiohttp.ClientSession:
        raise NotImplementedError

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._new_session()
        return self._session

    def _headers(self) -> dict[str, str]:
        return bearer_headers(self._token)

    def _redact(self, text: str) -> str:
        return redact(text, self._token)


def http_backoff(failures: int) -> float:
    """The documented delay after the n-th HTTP error in a row: 5 s, doubling, up to 320 s."""
    return min(HTTP_FIRST_S * 2 ** (failures - 1), HTTP_MAX_S)


def targeted_rules(classes: Iterable[str] | None = None) -> list[dict[str, str]]:
    """One rule per class, tagged with the class name, for original tweets with images.

    ``cow`` gives ``(cow OR cows OR #cow) has:images -is:retweet``. The default classes
    are the demo model's, less ``others`` (which names no animal to look for).
    """
    if classes is None:
        classes = default_classes()
    rules = []
    for name in classes:
        words = [*tag_words(name), f"#{singular(name)}"]
        rules.append({"value": f"({' OR '.join(words)}) has:images -is:retweet", "tag": name})
    return rules


def general_rules() -> list[dict[str, str]]:
    """A couple of broad rules for photos of anything.

    A rule needs at least one standalone operator (a keyword): ``has:images`` and
    ``-is:retweet`` alone are rejected by the API.
    """
    return [
        {
            "value": "(photo OR pic OR picture OR #photography) has:images -is:retweet",
            "tag": "general",
        },
        {
            "value": "(animal OR animals OR pet OR pets OR #animals) has:images -is:retweet",
            "tag": "general-animals",
        },
    ]


def load_rules(spec: str) -> list[dict[str, str]]:
    """The rules named by ``targeted``, ``general``, or a JSON file of ``[{value, tag}]``."""
    if spec == "targeted":
        return targeted_rules()
    if spec == "general":
        return general_rules()
    path = Path(spec)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigurationError(
            f"rules {spec!r}: not 'targeted', 'general' or a JSON file: {e}"
        ) from None
    if not isinstance(raw, list) or not all(
        isinstance(r, dict) and isinstance(r.get("value"), str) and r["value"] for r in raw
    ):
        raise ConfigurationError(f"rules file {path}: must be a list of {{'value', 'tag'}}")
    return [{"value": r["value"], "tag": str(r.get("tag") or "")} for r in raw]


class FilteredStream(XApiClient):
    """An async client of the X API v2 filtered stream and its rules.

    Use as ``async with FilteredStream(...) as stream`` (or call `close()`); the aiohttp
    session is opened on first use. `counters` counts connections, lines and failures by
    kind; `backoffs` holds every delay slept before a reconnect, in order.
    """

    def __init__(
        self,
        *,
        base_url: str,
        bearer_token: SecretStr,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        keepalive_timeout_s: float = 20.0,
        connect_timeout_s: float = 10.0,
        max_reconnects: int | None = None,
    ) -> None:
        super().__init__(base_url=base_url, bearer_token=bearer_token)
        metrics.expose(metrics.SOURCE)  # rule syncs and reconnects: a source's metrics
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_reconnects = max_reconnects
        self.counters: Counter[str] = Counter()
        self.backoffs: list[float] = []
        # Consecutive failures per back-off kind; a kind's count restarts at success.
        self._failures: Counter[str] = Counter()

    def _new_session(self) -> aiohttp.ClientSession:
        # No total or read timeout: the stream is endless and the keep-alive watchdog
        # below notices a silent connection.
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s)
        )

    # Rules ---------------------------------------------------------------------------

    async def _rules_call(
        self, method: str, *, body: dict | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        params = {"dry_run": "true"} if dry_run else None
        outcome = "error"
        try:
            async with self._http().request(
                method,
                self.base_url + RULES_PATH,
                json=body,
                params=params,
                headers=self._headers(),
            ) as resp:
                text = await resp.text()
                status = resp.status
            outcome = f"http_{status // 100}xx"
        except (TimeoutError, aiohttp.ClientError) as e:
            # `from None`: aiohttp errors can carry the request and its headers.
            raise XApiError(
                self._redact(f"{method} {RULES_PATH}: {type(e).__name__}: {e}")
            ) from None
        finally:
            metrics.RULE_SYNC_CALLS.labels(method=method, outcome=outcome).inc()
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = {"raw": text[:500]}
        if status >= 300:
            raise XApiError(
                self._redact(f"{method} {RULES_PATH}: HTTP {status}: {self._redact(text)[:500]}")
            )
        if not isinstance(payload, dict):
            raise XApiError(f"{method} {RULES_PATH}: answer is not a JSON object")
        return payload

    async def get_rules(self) -> list[dict[str, Any]]:
        """The rules in place now: ``[{"id", "value", "tag"}]``."""
        payload = await self._rules_call("GET")
        return list(payload.get("data") or [])

    async def _post_rules(self, body: dict, *, dry_run: bool) -> dict[str, Any]:
        payload = await self._rules_call("POST", body=body, dry_run=dry_run)
        # The API answers 200 with `errors` for rules it did not take; a duplicate is
        # harmless (it is in place), anything else (invalid syntax, too long) is not.
        errors = [e for e in payload.get("errors") or [] if e.get("title") != "DuplicateRule"]
        if errors:
            raise XApiError(f"rules not accepted: {self._redact(json.dumps(errors))[:1000]}")
        return payload

    async def sync_rules(
        self, wanted: list[dict[str, str]], *, dry_run: bool = False
    ) -> dict[str, Any]:
        """Make the stream's rules `wanted`, touching only what differs.

        Existing rules whose value is not wanted are deleted, and so is a wanted value
        with another tag (the API refuses a second rule of the same value, and the tag
        is what names the class downstream); missing rules are added. Rules already
        right are kept, so the stream never loses them. With `dry_run` the API only
        validates (``?dry_run=true``) and nothing changes.
        """
        wanted_tags = {r["value"]: r.get("tag") or "" for r in wanted}
        existing = await self.get_rules()
        delete_ids: list[str] = []
        kept: list[dict[str, Any]] = []
        in_place: set[str] = set()
        for rule in existing:
            value = rule.get("value")
            if value in wanted_tags and (rule.get("tag") or "") == wanted_tags[value]:
                kept.append(rule)
                in_place.add(value)
            else:
                delete_ids.append(str(rule["id"]))
        add = [
            {"value": value, "tag": tag}
            for value, tag in wanted_tags.items()
            if value not in in_place
        ]
        # Deletes first: a re-tagged value must be gone before it can be added again.
        if delete_ids:
            await self._post_rules({"delete": {"ids": delete_ids}}, dry_run=dry_run)
        if add:
            await self._post_rules({"add": add}, dry_run=dry_run)
        log.info(
            "rules%s: %d kept, %d added, %d deleted",
            " (dry run)" if dry_run else "",
            len(kept),
            len(add),
            len(delete_ids),
        )
        return {"kept": kept, "added": add, "deleted": delete_ids, "dry_run": dry_run}

    # Stream --------------------------------------------------------------------------

    def _backoff(self, failure: _Reconnect) -> float:
        self._failures[failure.kind] += 1
        n = self._failures[failure.kind]
        if failure.kind == "network":
            return min(NETWORK_STEP_S * n, NETWORK_MAX_S)
        if failure.kind == "rate_limit":
            delay = min(RATE_LIMIT_FIRST_S * 2 ** (n - 1), RATE_LIMIT_MAX_S)
            if failure.reset_at is not None:
                until_reset = failure.reset_at - self._wall_clock()
                delay = max(delay, min(until_reset, RATE_LIMIT_RESET_MAX_S))
            return delay
        # "http" and "stream_error"
        return http_backoff(n)

    async def stream_lines(self) -> AsyncIterator[dict[str, Any] | MalformedLine]:
        """Stream lines, parsed, for as long as the caller reads; reconnects as documented.

        Yields each line with ``data`` as a dict, and each line that is not a JSON
        object as a `MalformedLine`. Keep-alives are counted, error objects counted and
        followed by a reconnect. Raises `XApiError` for 400/401/403/404, and after
        `max_reconnects` reconnects when that is set. Close it (``contextlib.aclosing``)
        to drop the connection at once.
        """
        reconnects = 0
        while True:
            try:
                # aclosing: a caller that stops reading closes the connection now, not at GC.
                async with contextlib.aclosing(self._one_connection()) as items:
                    async for item in items:
                        yield item
                # The server ended the response: like a dropped connection.
                raise _Reconnect("network", "stream ended by the server")
            except _Reconnect as failure:
                if self.max_reconnects is not None and reconnects >= self.max_reconnects:
                    raise XApiError(
                        f"gave up after {reconnects} reconnects; last: {failure.reason}"
                    ) from None
                reconnects += 1
                self.counters["reconnects"] += 1
                delay = self._backoff(failure)
                self.backoffs.append(delay)
                log.warning("X stream: %s; reconnecting in %.2f s", failure.reason, delay)
                metrics.SOURCE_RECONNECTS.labels(source="twitter").inc()
                metrics.SOURCE_BACKOFF.labels(source="twitter").inc(delay)
                await self._sleep(delay)

    async def _one_connection(self) -> AsyncIterator[dict[str, Any] | MalformedLine]:
        try:
            response = await self._http().get(
                self.base_url + STREAM_PATH, params=STREAM_PARAMS, headers=self._headers()
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self.counters["network_errors"] += 1
            raise _Reconnect("network", f"connect failed: {type(e).__name__}") from None
        async with response:
            if response.status != 200:
                await self._refuse(response)
            self.counters["connections"] += 1
            # A connection that got in restarts the schedules of getting in; the
            # in-stream error schedule restarts only with a tweet (an error object
            # right after every 200 must still back off further each time).
            for kind in ("network", "http", "rate_limit"):
                self._failures.pop(kind, None)
            async with contextlib.aclosing(self._lines(response)) as lines:
                async for raw in lines:
                    yield self._parse(raw)

    async def _refuse(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        self.counters[f"http_{status}"] += 1
        body = ""
        # The body only explains the refusal; a server that never sends it must not hang us.
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            raw = await asyncio.wait_for(response.content.read(2000), self.connect_timeout_s)
            body = raw.decode("utf-8", "replace")
        if status in FATAL_STATUSES:
            raise XApiError(f"GET {STREAM_PATH}: HTTP {status}: {self._redact(body)[:500]}")
        if status == 429:
            reset_at = None
            with contextlib.suppress(KeyError, ValueError):
                reset_at = float(response.headers["x-rate-limit-reset"])
            raise _Reconnect("rate_limit", "HTTP 429 (rate limited)", reset_at=reset_at)
        raise _Reconnect("http", f"HTTP {status}")

    async def _lines(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The lines of one response, without their ``\\r\\n``; keep-alives reset the watchdog."""
        buffer = b""
        last_activity = self._clock()
        while True:
            left = last_activity + self.keepalive_timeout_s - self._clock()
            try:
                chunk = await asyncio.wait_for(response.content.readany(), max(left, 0.0))
            except TimeoutError:
                self.counters["stalls"] += 1
                raise _Reconnect("network", f"no data for {self.keepalive_timeout_s:g} s") from None
            except (aiohttp.ClientError, OSError) as e:
                self.counters["network_errors"] += 1
                if buffer.strip():
                    self.counters["truncated_lines"] += 1
                raise _Reconnect("network", f"connection lost: {type(e).__name__}") from None
            if not chunk:
                if buffer.strip():
                    # Cut mid-line: the rest never comes; the API resends on reconnect.
                    self.counters["truncated_lines"] += 1
                raise _Reconnect("network", "connection closed")
            last_activity = self._clock()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if line.strip():
                    yield line
                else:
                    self.counters["keepalives"] += 1
            if len(buffer) > MAX_LINE_BYTES:
                yield buffer  # parsed as malformed: dead-lettered, not lost
                buffer = b""

    def _parse(self, raw: bytes) -> dict[str, Any] | MalformedLine:
        try:
            line = json.loads(raw)
        except ValueError as e:
            self.counters["malformed"] += 1
            return MalformedLine(raw=raw, error=f"not JSON: {e}"[:500])
        if not isinstance(line, dict):
            self.counters["malformed"] += 1
            return MalformedLine(raw=raw, error=f"not a JSON object: {type(line).__name__}")
        if "data" in line:
            self.counters["lines"] += 1
            self._failures.pop("stream_error", None)
            return line
        errors = line.get("errors")
        if isinstance(errors, list) and errors:
            titles = [
                str(e.get("title", "unknown")) if isinstance(e, dict) else "unknown" for e in errors
            ]
            for title in titles:
                self.counters[f"stream_error:{title}"] += 1
            raise _Reconnect("stream_error", f"stream error {', '.join(titles)}")
        self.counters["malformed"] += 1
        return MalformedLine(raw=raw, error="object with neither 'data' nor 'errors'")


# Source --------------------------------------------------------------------------------

#: Tweet ids remembered to drop the replays of a reconnect.
RECENT_IDS = 50_000

#: Where stream lines come from, for their dead letters (no topic, partition or offset).
X_STREAM_SOURCE = SourceRef("x-api-stream")


class XStreamSource(TweetSource):
    """The tweets of a `FilteredStream`; lines that are not tweets are `Rejected`.

    The stream may replay tweets after a reconnect: the pump drops repeats of the last
    `RECENT_IDS` ids. Each line read is handed on as ``raw`` for the archive."""

    name = "twitter"
    dead_letter_stage = "x_stream"
    repeats = RECENT_IDS

    def __init__(self, stream: FilteredStream) -> None:
        self.stream = stream

    async def items(self) -> AsyncIterator[SourceItem]:
        async with contextlib.aclosing(self.stream.stream_lines()) as lines:
            async for line in lines:
                if isinstance(line, MalformedLine):
                    rejected = Rejected(line.raw, line.error, X_STREAM_SOURCE)
                    yield SourceItem(rejected=rejected, raw=line.raw)
                    continue
                try:
                    tweet = tweet_from_stream_line(line, source=self.name, ingested_at_ms=now_ms())
                except CodecError as e:
                    rejected = Rejected(json.dumps(line).encode(), str(e), X_STREAM_SOURCE)
                    yield SourceItem(rejected=rejected, raw=line)
                    continue
                yield SourceItem(tweet=tweet, raw=line)


async def run_twitter_producer(
    settings: Settings,
    *,
    rules: str,
    dry_run: bool,
    stop: asyncio.Event | None,
    max_tweets: int | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    archive: StreamArchive | None = None,
) -> Counter[str]:
    """Sync the stream's rules, then produce its tweets to `tweets` until `stop`.

    `rules` is ``targeted``, ``general`` or the path of a JSON file of rules. With
    `dry_run` the rules are only validated by the API, and nothing is streamed. Each data
    line becomes a Tweet record (`matching_rules` kept, key = tweet id); a line that is
    not JSON, or not a tweet (`CodecError`), becomes a DeadLetter (stage ``x_stream``)
    holding its bytes. At-least-once from the stream's point of view: see the module
    docstring. Everything produced is flushed before returning, also on `stop`. `sleep`
    is the back-off sleep (tests inject one that does not wait). With `archive`, every
    line read (malformed ones included, duplicates too) is archived as received, before
    it is produced; the caller closes the archive.
    """
    token = require_token(settings)
    wanted = load_rules(rules)
    counts: Counter[str] = Counter()
    async with FilteredStream(
        base_url=settings.x_api_base_url, bearer_token=token, sleep=sleep
    ) as stream:
        synced = await stream.sync_rules(wanted, dry_run=dry_run)
        counts.update(
            rules_kept=len(synced["kept"]),
            rules_added=len(synced["added"]),
            rules_deleted=len(synced["deleted"]),
        )
        if dry_run:
            return counts
        try:
            counts.update(
                await run_source(
                    settings,
                    XStreamSource(stream),
                    stop=stop,
                    max_tweets=max_tweets,
                    archive=archive,
                )
            )
        finally:
            counts.update(stream.counters)
    log.info("X stream producer: %s", dict(counts))
    return counts
