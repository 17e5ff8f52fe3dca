"""Trending hashtags over a sliding window: a Faust service that consumes `hashtags`.

An example to copy: a service of its own, next to tagstream, that imports nothing of it.
It is its own `faust.App` (its own id, so its own consumer group, internal topic and table
changelogs), and it reads tagstream's `hashtags` topic as any other consumer would:

* agent `split` reads each HashtagResult (raw bytes, decoded by examples/records.py),
  drops repeats by media key (tagstream delivers at least once, so a result can arrive
  twice), and forwards each of its hashtags, keyed by the hashtag, to the app's own
  one-partition topic ``<app id>-tags``, with the result's timestamp;
* agent `count` counts them in a hopping windowed table (``window_s`` long, a new window
  every ``step_s``): a sliding window, in steps. The count of a hashtag lives in one
  partition, so it is whole;
* ``GET /top?n=10`` answers the hashtags of the window that covers the last ``window_s``
  seconds, most counted first.

State: both tables live in memory and Faust writes every change to their changelog
topics; at start a worker rebuilds them from the changelogs before it reads on, so a
restart keeps the counts and the media keys already seen. One worker serves the whole top
N (the tags topic has one partition); more workers share `split`, and only the one that
holds the tags partition answers with counts.

Delivery guarantee: at-least-once, Faust's without transactions. Repeats from tagstream
are dropped by media key within the window; a crash of this service between forwarding a
result's hashtags and committing the result can still count them twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import faust
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

#: Decodes one message value of a topic (examples/records.py: `reader`).
Reader = Callable[[bytes, str], dict[str, Any]]


def topic_partitions(bootstrap: str, topic: str) -> int:
    """How many partitions ``topic`` has: the media-key table follows them."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise SystemExit(f"error: topic {topic!r} does not exist")
    return len(found.partitions)


def create_app(
    *,
    bootstrap: str,
    topic: str,
    read: Reader,
    app_id: str = "trending-hashtags",
    window_s: float = 900.0,
    step_s: float = 60.0,
    top_n: int = 10,
    web_host: str = "127.0.0.1",
    web_port: int = 6067,
    session_timeout_s: float = 10.0,
    **faust_settings: Any,
) -> faust.App:
    """The app counting the hashtags of ``topic`` (tagstream's `hashtags`, full name).

    ``faust_settings`` are more settings of `faust.App` (``broker_credentials``,
    ``producer_*``, ...), or replace the ones here."""
    settings: dict[str, Any] = {
        "broker": [f"kafka://{server.strip()}" for server in bootstrap.split(",")],
        "store": "memory://",
        "autodiscover": False,
        "topic_partitions": topic_partitions(bootstrap, topic),
        "broker_session_timeout": session_timeout_s,
        "broker_heartbeat_interval": max(0.5, session_timeout_s / 6),
        "consumer_auto_offset_reset": "earliest",
        "key_serializer": "raw",
        "value_serializer": "raw",
        "web_host": web_host,
        "web_bind": web_host,
        "web_port": web_port,
    }
    app = faust.App(app_id, **(settings | faust_settings))
    results = app.topic(topic)
    tags = app.topic(f"{app_id}-tags", partitions=1, internal=True)
    # Keyed by media key, written from the partition of the result: co-partitioned with it.
    seen = app.Table("seen-media", default=int).tumbling(window_s, expires=2 * window_s)
    counts = app.Table("counts", default=int, partitions=1).hopping(
        window_s, step_s, expires=2 * window_s, key_index=True
    )

    @app.agent(results)
    async def split(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                result = read(event.value, topic)
                media_key, hashtags = result["media_key"], result["hashtags"]
            except Exception as exc:  # not a HashtagResult: say so, and go on
                log.warning("skipped %s[%d]@%d: %s", topic, *_where(event), exc)
                continue
            if seen[media_key].current() or seen[media_key].delta(window_s):
                continue  # a repeat: already counted
            seen[media_key] = 1
            for tag in dict.fromkeys(hashtags):
                await tags.send(key=tag.encode(), value=b"1", timestamp=event.message.timestamp)

    @app.agent(tags)
    async def count(stream: faust.StreamT) -> None:
        async for event in stream.events():
            counts[event.key.decode()] += 1

    @app.page("/top")
    async def top(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        n = int(request.query.get("n", top_n))
        now = time.time()
        start, end = counts.table.window.earliest(now)
        ranked = sorted(
            ((tag, c) for tag, c in counts.items().now() if c > 0), key=lambda t: (-t[1], t[0])
        )
        return web.json(
            {
                "window": {"start": start, "end": end, "size_s": window_s, "step_s": step_s},
                "top": [{"hashtag": tag, "count": c} for tag, c in ranked[:n]],
            }
        )

    return app


def _where(event: Any) -> tuple[int, int]:
    return event.message.partition, event.message.offset
