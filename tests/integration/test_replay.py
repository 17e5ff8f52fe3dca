"""Replay on the embedded broker: an archive at 10x with the real clock, then a topic range.

The archive holds ~30 lines (a few tweet ids repeated, to check the order per key, and
one malformed line) with receive times spanning ~2 s. At 10x the tweets must arrive
spread over ~0.2 s, each at its original offset / 10 within 50 ms, all with the run id.
The topic replay then copies an offset range of that `tweets` topic into a second set of
topics with a new run id.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from producers.archive import StreamArchive
from producers.replay import replay
from tests.helpers import KafkaReader

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000.0


def stream_line(tweet_id: str, version: int) -> dict[str, Any]:
    return {
        "data": {"id": tweet_id, "text": f"v{version}"},
        "matching_rules": [{"id": "9", "tag": "cow"}],
    }


def write_archive(folder: Path) -> list[tuple[float, dict[str, Any] | bytes]]:
    rng = random.Random(7)
    lines: list[tuple[float, dict[str, Any] | bytes]] = []
    t = T0
    versions: Counter[str] = Counter()
    for n in range(30):
        if n == 11:
            lines.append((t, b"{not json"))
        else:
            tweet_id = f"{500 + n % 8}"  # 8 ids, each several times: order per key
            versions[tweet_id] += 1
            lines.append((t, stream_line(tweet_id, versions[tweet_id])))
        t += rng.uniform(20, 120)
    with StreamArchive(folder, max_bytes=800) as archive:  # a few files
        for t_ms, line in lines:
            archive.write(line, t_ms=t_ms)
    assert len(archive.closed_files) > 1
    return lines


def test_archive_replay_keeps_timing_then_topic_range_replay(make_settings, tmp_path) -> None:
    lines = write_archive(tmp_path / "archive")
    assert 1500 < lines[-1][0] - T0 < 3500
    source = make_settings()
    counts = replay(source, archive=tmp_path / "archive", speed="10x", run_id="run-a")
    tweets_in = [(t, line) for t, line in lines if isinstance(line, dict)]
    assert counts["tweets"] == len(tweets_in) and counts["dead_letters"] == 1
    assert counts.run_id == "run-a"

    reader = KafkaReader(source, {"tweets": "Tweet", "deadletter": "DeadLetter"})
    try:
        found = reader.read_until(
            lambda f: len(f["tweets"]) >= len(tweets_in) and f["deadletter"], timeout_s=20
        )
        found = reader.read_until(lambda f: False, timeout_s=0.5)  # nothing more comes
    finally:
        reader.close()
    got = found["tweets"]
    assert len(got) == len(tweets_in)
    assert all(t["replay_run_id"] == "run-a" and t["source"] == "replay" for t in got)
    assert all(t["_key"] == t["id"].encode() for t in got)
    per_key: dict[str, list[str]] = defaultdict(list)
    for t in got:
        per_key[t["id"]].append(t["text"])
    for texts in per_key.values():
        assert texts == [f"v{i}" for i in range(1, len(texts) + 1)]
    [letter] = found["deadletter"]
    assert letter["stage"] == "replay" and letter["payload"] == b"{not json"

    # Timing: each tweet's ingest time, from the first, is its original offset / 10.
    expected = {(line["data"]["id"], line["data"]["text"]): (t - T0) / 10 for t, line in tweets_in}
    first = min(t["ingested_at_ms"] for t in got)
    errors = [abs((t["ingested_at_ms"] - first) - expected[(t["id"], t["text"])]) for t in got]
    assert max(errors) < 50, f"timing off by up to {max(errors):.1f} ms"

    # Topic replay: offsets [1, 3) of every partition of `tweets` into fresh topics.
    target = make_settings()
    topic_counts = replay(target, topic=source.topic("tweets"), start=1, stop=3, speed="max")
    assert topic_counts.run_id and topic_counts.run_id != "run-a"
    # What the range should hold: every source record, with its offset, to the end.
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from infra.kafka import consumer_config

    consumer = Consumer(consumer_config(source, "check", **{"enable.partition.eof": True}))
    wanted: list[tuple[str, str]] = []
    try:
        partitions = set(range(source.topic_partitions))
        consumer.assign([TopicPartition(source.topic("tweets"), p, 0) for p in partitions])
        total = 0
        while partitions:
            for message in consumer.consume(100, timeout=0.5):
                if message.error():
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        partitions.discard(message.partition())
                    continue
                total += 1
                if 1 <= message.offset() < 3:
                    tweet = reader.codec.decode("Tweet", message.value())
                    wanted.append((tweet["id"], tweet["text"]))
    finally:
        consumer.close()
    assert total == len(tweets_in)
    need = len(wanted)
    assert topic_counts["tweets"] == need > 0

    reader = KafkaReader(target, {"tweets": "Tweet"})
    try:
        copied = reader.read_until(lambda f: len(f["tweets"]) >= need, timeout_s=20)["tweets"]
        copied = reader.read_until(lambda f: False, timeout_s=0.5)["tweets"]
    finally:
        reader.close()
    assert sorted((t["id"], t["text"]) for t in copied) == sorted(wanted)
    assert all(t["replay_run_id"] == topic_counts.run_id for t in copied)


def test_twitter_producer_archives_every_line_as_received(make_settings, tmp_path) -> None:
    import asyncio

    from producers.archive import read_archive
    from producers.xapi import run_twitter_producer
    from tests.unit.test_xapi import FakeXApi, mixed_feed

    feed = mixed_feed(4)
    fake = FakeXApi(feed, [[("tweets", 2), ("raw", b"{oops\r\n"), ("tweets", 2)]])

    async def no_wait(delay: float) -> None:
        return None

    async def main() -> None:
        base = await fake.start()
        try:
            settings = make_settings(x_api_base_url=base, x_bearer_token="secret-token")
            with StreamArchive(tmp_path / "x") as archive:
                counts = await asyncio.wait_for(
                    run_twitter_producer(
                        settings,
                        rules="general",
                        dry_run=False,
                        stop=None,
                        max_tweets=len(feed),
                        sleep=no_wait,
                        archive=archive,
                    ),
                    30,
                )
            assert counts["archived"] == len(feed) + 1
        finally:
            await fake.stop()

    asyncio.run(main())
    got = list(read_archive(tmp_path / "x"))
    assert [line for _, line in got] == feed[:2] + [b"{oops"] + feed[2:]
    assert all(t is not None and t > 1e12 for t, _ in got)
