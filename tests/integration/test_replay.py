"""Replay on the embedded broker: an archive at 10x with the real clock, then a topic range.

The archive holds ~30 lines (a few tweet ids repeated, to check the order per key, and
one malformed line) with receive times spanning ~2 s. At 10x the tweets must arrive
spread over ~0.2 s, each at its original offset / 10 within 50 ms, all with the run id.
The topic replay then copies an offset range of that `tweets` topic into a second set of
topics with a new run id.

Then the `produce replay` command in process (summary line, records, time bounds given as
ISO times, one clear `error:` line for bad input), topic time bounds (start inclusive,
stop exclusive, by record timestamp; tansu answers `offsets_for_times` with the earliest
offset for any time, so the bounds must hold on what is read), and the streaming merge's
bounded read-ahead.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from producers.archive import StreamArchive
from producers.replay import replay
from tests.helpers import KafkaReader, run_cli, settings_env

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
    assert [a.line for a in got] == feed[:2] + [b"{oops"] + feed[2:]
    assert all(a.t_ms is not None and a.t_ms > 1e12 for a in got)
    assert {a.line_format for a in got} == {None}  # X lines, as archives always held them


# The `produce replay` command, in process ---------------------------------------------


def run_replay_cli(monkeypatch: pytest.MonkeyPatch, settings, *argv: str) -> int:
    """`tagstream produce replay ARGV` with `settings` as its environment."""
    return run_cli(monkeypatch, settings_env(settings), "produce", "replay", *argv)


def read_topics(settings, *, tweets: int, letters: int = 0) -> tuple[list[dict], list[dict]]:
    """The Tweets and DeadLetters on `settings`' topics, once at least as many as asked
    have come, plus whatever else comes within half a second."""
    reader = KafkaReader(settings, {"tweets": "Tweet", "deadletter": "DeadLetter"})
    try:
        reader.read_until(
            lambda f: len(f["tweets"]) >= tweets and len(f["deadletter"]) >= letters,
            timeout_s=20,
        )
        found = reader.read_until(lambda f: False, timeout_s=0.5)
    finally:
        reader.close()
    return found["tweets"], found["deadletter"]


def iso(t_ms: float) -> str:
    return datetime.fromtimestamp(t_ms / 1000, UTC).isoformat()


def test_cli_replays_an_archive_at_max_speed(make_settings, tmp_path, monkeypatch, capsys) -> None:
    lines = write_archive(tmp_path / "archive")
    tweets_in = [line for _, line in lines if isinstance(line, dict)]
    settings = make_settings()
    argv = ("--archive", str(tmp_path / "archive"), "--speed", "max", "--run-id", "cli-1")
    assert run_replay_cli(monkeypatch, settings, *argv) == 0
    out = capsys.readouterr().out
    assert out == f"replay cli-1: dead_letters=1, tweets={len(tweets_in)}\n"
    got, letters = read_topics(settings, tweets=len(tweets_in), letters=1)
    assert sorted((t["id"], t["text"]) for t in got) == sorted(
        (line["data"]["id"], line["data"]["text"]) for line in tweets_in
    )
    assert all(t["replay_run_id"] == "cli-1" and t["source"] == "replay" for t in got)
    [letter] = letters
    assert letter["stage"] == "replay" and letter["payload"] == b"{not json"


def test_cli_archive_time_bounds_are_start_inclusive_stop_exclusive(
    make_settings, tmp_path, monkeypatch, capsys
) -> None:
    with StreamArchive(tmp_path / "a") as archive:
        for n in range(10):  # line n at T0 + 100 n ms; line 4 is not JSON
            archive.write(stream_line(f"{900 + n}", 1) if n != 4 else b"oops", t_ms=T0 + 100 * n)
    settings = make_settings()
    argv = ("--archive", str(tmp_path / "a"), "--from", iso(T0 + 200), "--to", iso(T0 + 700))
    assert run_replay_cli(monkeypatch, settings, *argv, "--speed", "max", "--run-id", "r") == 0
    assert capsys.readouterr().out == "replay r: dead_letters=1, tweets=4\n"
    got, letters = read_topics(settings, tweets=4, letters=1)
    assert sorted(t["id"] for t in got) == ["902", "903", "905", "906"]
    assert [letter["payload"] for letter in letters] == [b"oops"]


def test_cli_bad_input_is_one_clear_error_line(
    make_settings, tmp_path, monkeypatch, capsys
) -> None:
    import time

    settings = make_settings()
    write_archive(tmp_path / "archive")
    archive = str(tmp_path / "archive")
    cases = {
        ("--archive", str(tmp_path / "nowhere")): f"no archive at {tmp_path / 'nowhere'}",
        ("--archive", archive, "--speed", "fast"): "speed 'fast'",
        ("--archive", archive, "--speed", "0x"): "speed '0x'",
        ("--archive", archive, "--from", "yesterday"): "bound 'yesterday'",
        ("--topic", archive, "--to", "2024-13-01"): "bound '2024-13-01'",
        ("--topic", "no-such-topic"): "topic 'no-such-topic'",
    }
    for argv, message in cases.items():
        began = time.monotonic()
        assert run_replay_cli(monkeypatch, settings, *argv) == 1, argv
        took = time.monotonic() - began
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: {message}"), captured
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
        assert took < 5, f"{argv} took {took:.1f} s"


# Topic time bounds -----------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that only `sleep` moves, recording the sleeps."""

    def __init__(self) -> None:
        self.now = 50.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def archived_topic(settings) -> str:
    """12 Tweets on `settings`' `tweets` topic, tweet 7n at T0 + n s in partition n % 2,
    with both ingested_at_ms and the record timestamp at that time, plus two records that
    are not Tweets, at T0 + 5.5 s (partition 1) and T0 + 9.5 s (partition 0)."""
    from confluent_kafka import Producer

    from infra.kafka import producer_config
    from producers.tweets import tweet_from_stream_line
    from schemas.codec import Codec

    codec = Codec.from_settings(settings)
    topic = settings.topic("tweets")
    producer = Producer(producer_config(settings))
    records: list[tuple[float, int, bytes, bytes]] = []
    for n in range(12):
        tweet = tweet_from_stream_line(
            stream_line(f"{700 + n}", 1), source="x", ingested_at_ms=T0 + 1000 * n
        )
        value = codec.encode("Tweet", tweet, topic=topic)
        records.append((T0 + 1000 * n, n % 2, tweet["id"].encode(), value))
    records += [(T0 + 5500, 1, b"bad", b"not a tweet 1"), (T0 + 9500, 0, b"bad", b"not a tweet 2")]
    for t_ms, partition, key, value in sorted(records):
        producer.produce(topic, value, key, partition=partition, timestamp=int(t_ms))
    assert producer.flush(20) == 0
    return topic


def test_topic_time_bounds_select_by_record_time(make_settings, monkeypatch, capsys) -> None:
    source = make_settings()
    topic = archived_topic(source)

    def timed(start_s: float | None, stop_s: float | None, **kw: Any) -> tuple[Any, list]:
        fake = FakeClock()
        bound = {
            name: datetime.fromtimestamp((T0 + 1000 * s) / 1000, UTC)
            for name, s in (("start", start_s), ("stop", stop_s))
            if s is not None
        }
        counts = replay(
            make_settings(), topic=topic, speed="1x", clock=fake.clock, sleep=fake.sleep, **bound
        )
        return counts, fake.sleeps

    # [3 s, 8 s): tweets 703..707 and the bad record at 5.5 s, merged by time over both
    # partitions (a wrong order would skip sleeps), each sent its gap after the one before.
    counts, sleeps = timed(3, 8)
    assert (counts["tweets"], counts["dead_letters"]) == (5, 1)
    assert sleeps == [1.0, 1.0, 0.5, 0.5, 1.0]
    counts, sleeps = timed(None, 2)  # to 2 s: 700 and 701
    assert (counts["tweets"], counts["dead_letters"], sleeps) == (2, 0, [1.0])
    counts, sleeps = timed(9.5, None)  # from 9.5 s: the bad record, 710 and 711
    assert (counts["tweets"], counts["dead_letters"], sleeps) == (2, 1, [0.5, 1.0])
    counts, sleeps = timed(3.5, 3.9)  # between two records
    assert (counts["tweets"], counts["dead_letters"], sleeps) == (0, 0, [])
    counts, sleeps = timed(60, None)  # after the end
    assert (counts["tweets"], counts["dead_letters"], sleeps) == (0, 0, [])

    # The same [3 s, 8 s) by the command, with ISO times: exactly those records arrive.
    target = make_settings()
    argv = ("--topic", topic, "--from", iso(T0 + 3000), "--to", iso(T0 + 8000))
    assert run_replay_cli(monkeypatch, target, *argv, "--speed", "max", "--run-id", "t") == 0
    assert capsys.readouterr().out == "replay t: dead_letters=1, tweets=5\n"
    got, letters = read_topics(target, tweets=5, letters=1)
    assert sorted(t["id"] for t in got) == [f"{n}" for n in range(703, 708)]
    assert all(t["replay_run_id"] == "t" and t["source"] == "replay" for t in got)
    assert [(d["payload"], d["source_offset"]) for d in letters] == [(b"not a tweet 1", 3)]


def test_topic_replay_streams_with_a_bounded_read_ahead(make_settings, monkeypatch) -> None:
    """Partition 0 holds the first 3 s, partition 1 the next 3 s: the merge must drain
    partition 0 while partition 1 waits paused, never buffering more than it may."""
    from collections import deque

    from confluent_kafka import Producer

    from infra.kafka import producer_config
    from producers import replay as replay_module

    settings = make_settings()
    topic = settings.topic("images")  # any topic: these records are not Tweets
    producer = Producer(producer_config(settings))
    for partition in (1, 0):
        for n in range(30):
            t_ms = int(T0) + 3000 * partition + 100 * n
            producer.produce(
                topic, f"{partition}-{n}".encode(), partition=partition, timestamp=t_ms
            )
    assert producer.flush(20) == 0

    most: list[int] = [0]

    class Buffer(deque):
        def append(self, item: Any) -> None:
            super().append(item)
            most[0] = max(most[0], len(self))

    class Tracked(replay_module._Partition):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.buffer = Buffer()

    monkeypatch.setattr(replay_module, "READ_AHEAD", 4)
    monkeypatch.setattr(replay_module, "_Partition", Tracked)
    items = list(replay_module._topic_items(settings, topic, None, None))
    assert [item.raw for item in items] == [f"{p}-{n}".encode() for p in (0, 1) for n in range(30)]
    assert [item.t_ms for item in items] == [T0 + 100 * n for n in range(60)]
    assert 4 <= most[0] <= 4 + 4 - 1  # the read-ahead, plus the rest of one batch
