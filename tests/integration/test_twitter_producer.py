"""The X stream producer on the embedded broker, fed by the fake X API of test_xapi.

The fake drops the connection mid-line, replays a tweet on the reconnect (as the API's
backfill may), sends a keep-alive, a malformed line, an error object and a tweet that is
not one (no ``data.id``); every tweet must reach `tweets` exactly once, and each bad
line must be a DeadLetter with its bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from infra.settings import Settings
from producers.xapi import run_twitter_producer, targeted_rules
from tests.helpers import KafkaReader
from tests.unit.test_xapi import KEEPALIVE, FakeXApi, mixed_feed, wire

pytestmark = pytest.mark.integration

TOKEN = "secret-token"


def test_every_stream_tweet_lands_once_and_bad_lines_are_dead_letters(make_settings) -> None:
    feed = mixed_feed(12)
    not_a_tweet = {"data": {"text": "no id"}}
    fake = FakeXApi(
        feed,
        [
            [KEEPALIVE, ("tweets", 4), ("raw", b"{oops not json\r\n"), ("drop",)],
            [("replay", 1), ("tweets", 4), ("raw", wire(not_a_tweet))],
            [("tweets", 1), ("raw", wire({"errors": [{"title": "operational-disconnect"}]}))],
            [("tweets", 4)],
        ],
        rules=[{"id": "5", "value": "stale has:images", "tag": "stale"}],
    )

    backoffs: list[float] = []

    async def no_wait(delay: float) -> None:
        backoffs.append(delay)

    async def main() -> tuple[Counter[str], Settings]:
        base = await fake.start()
        try:
            settings = make_settings(x_api_base_url=base, x_bearer_token=TOKEN)
            counts = await asyncio.wait_for(
                run_twitter_producer(
                    settings,
                    rules="targeted",
                    dry_run=False,
                    stop=None,
                    max_tweets=len(feed),
                    sleep=no_wait,
                ),
                30,
            )
            return counts, settings
        finally:
            await fake.stop()

    counts, settings = asyncio.run(main())
    assert counts["tweets"] == len(feed)
    assert backoffs == [0.25, 0.25, 5.0]  # drop, end of response, error object
    assert counts["duplicates"] == 1
    assert counts["dead_letters"] == 2
    assert counts["stream_error:operational-disconnect"] == 1
    assert sorted(r["tag"] for r in fake.rules.values()) == sorted(
        r["tag"] for r in targeted_rules()
    )

    reader = KafkaReader(settings, {"tweets": "Tweet", "deadletter": "DeadLetter"})
    try:
        found = reader.read_until(
            lambda f: len(f["tweets"]) >= len(feed) and len(f["deadletter"]) >= 2, timeout_s=20
        )
        # Everything was flushed before the producer returned: a short extra read shows
        # that nothing more (no duplicate) is on the way.
        found = reader.read_until(lambda f: False, timeout_s=1.0)
    finally:
        reader.close()

    per_id = Counter(t["id"] for t in found["tweets"])
    assert per_id == Counter(line["data"]["id"] for line in feed)
    by_id = {t["id"]: t for t in found["tweets"]}
    for line in feed:
        tweet = by_id[line["data"]["id"]]
        assert tweet["_key"] == line["data"]["id"].encode()
        assert tweet["source"] == "twitter"
        assert tweet["matching_rules"] == [{"id": "77", "tag": "cow"}]
        assert [m["media_key"] for m in tweet["media"]] == line["data"]["attachments"]["media_keys"]

    letters = sorted(found["deadletter"], key=lambda d: d["payload"])
    assert [d["payload"] for d in letters] == sorted(
        [b"{oops not json", json.dumps(not_a_tweet).encode()]
    )
    for letter in letters:
        assert letter["stage"] == "x_stream"
        assert letter["source_topic"] == "x-api-stream"
        assert (letter["source_partition"], letter["source_offset"]) == (-1, -1)
        assert letter["error_class"] == "CodecError"


def test_stop_ends_a_waiting_stream_and_flushes_what_it_read(make_settings) -> None:
    feed = mixed_feed(3)
    fake = FakeXApi(feed, [[("tweets", 3), ("stall",)]])

    async def main() -> tuple[Counter[str], Settings]:
        base = await fake.start()
        try:
            settings = make_settings(x_api_base_url=base, x_bearer_token=TOKEN)
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_twitter_producer(settings, rules="general", dry_run=False, stop=stop)
            )
            while fake.cursor < len(feed):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the client reads what was written; then it waits
            stop.set()
            return await asyncio.wait_for(task, 10), settings
        finally:
            await fake.stop()

    counts, settings = asyncio.run(main())
    assert counts["tweets"] == 3 and counts["reconnects"] == 0
    reader = KafkaReader(settings, {"tweets": "Tweet"})
    try:
        found = reader.read_until(lambda f: len(f["tweets"]) >= 3, timeout_s=20)
    finally:
        reader.close()
    assert sorted(t["id"] for t in found["tweets"]) == [line["data"]["id"] for line in feed]
