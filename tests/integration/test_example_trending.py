"""examples/trending end to end on the embedded broker: counts, repeats, restart, recovery.

The example runs as users run it (``python -m examples.trending``), a Faust worker of its
own. Results written by our RecordProducer are counted per hashtag in its windowed table
and served on ``/top``; a repeat of a media key is not counted; an undecodable record is
skipped. The worker is stopped once its offsets are committed past every result, so the
restarted worker reads none of them again: the counts it serves can only come from the
table's changelog. After the restart, a repeat of an old result is still dropped (the
media keys came back too) and new results add to the recovered counts.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from examples.read_topic import read_topics
from infra.broker import free_port
from infra.record_producer import RecordProducer
from infra.settings import Settings
from tagstream.up import ProcessGroup, child_env
from tests.samples import VALUES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _result(media_key: str, *tags: str) -> dict:
    return dict(
        VALUES["HashtagResult"],
        tweet_id=f"t{media_key}",
        media_key=media_key,
        hashtags=list(tags),
        thumbnail=None,
    )


def _send(settings: Settings, results: list[dict], garbage: bool = False) -> None:
    with RecordProducer(settings) as producer:
        for result in results:
            producer.send("hashtags", result, key=result["tweet_id"])
        if garbage:
            producer.send_raw(settings.topic("hashtags"), key="bad", value=b"not a record")


class Trending:
    """One run of the example's worker, and its /top."""

    def __init__(self, settings: Settings, app_id: str, logs: Path, name: str) -> None:
        self.port = free_port()
        self.logs = logs
        self.group = ProcessGroup(env=child_env({"PYTHONPATH": str(REPO)}), log_dir=logs)
        self.name = name
        self.process = self.group.start(
            name,
            [
                sys.executable,
                "-m",
                "examples.trending",
                "--bootstrap",
                settings.bootstrap(),
                "--topic",
                settings.topic("hashtags"),
                "--schemas",
                str(REPO / "schemas"),
                "--app-id",
                app_id,
                "--web-port",
                str(self.port),
                "--session-timeout",
                "6",
                "--window",
                "3600",
                "--step",
                "60",
                # One record per produce request. The embedded broker (tansu) answers a
                # high watermark one past the *first* record of a partition's last batch,
                # and Faust's recovery reads a changelog only that far: batches of many
                # changelog records would lose their tail on tansu (Kafka is exact).
                "--faust",
                "producer_max_batch_size=1",
            ],
        )

    def top(self) -> dict[str, int] | None:
        try:
            url = f"http://127.0.0.1:{self.port}/top?n=50"
            with urllib.request.urlopen(url, timeout=2) as answer:
                body = json.loads(answer.read())
        except OSError:
            return None
        return {item["hashtag"]: item["count"] for item in body["top"]}

    def wait_for(self, expected: dict[str, int], timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            seen = self.top()
            if seen == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"/top showed {seen}, not {expected}\n{self.log()}")

    def log(self) -> str:
        path = self.logs / f"{self.name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        self.group.stop_all(timeout_s=30)


def _wait_committed(settings: Settings, app_id: str, timeout_s: float = 30.0) -> None:
    """Until the app's group has committed past every record of `hashtags`."""
    topic = settings.topic("hashtags")
    ends: dict[int, int] = {}
    for line in read_topics(settings.bootstrap(), [topic], lambda data, _: {}):
        ends[line["partition"]] = line["offset"] + 1
    consumer = Consumer({"bootstrap.servers": settings.bootstrap(), "group.id": app_id})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            committed = {
                tp.partition: tp.offset
                for tp in consumer.committed([TopicPartition(topic, p) for p in ends], timeout=10)
            }
            if all(committed.get(p, -1) >= end for p, end in ends.items()):
                return
            assert time.monotonic() < deadline, f"committed {committed}, ends {ends}"
            time.sleep(0.5)
    finally:
        consumer.close()


def test_trending_counts_survive_a_restart_through_the_changelog(
    make_settings, tmp_path: Path
) -> None:
    settings = make_settings()
    app_id = f"trending-{uuid.uuid4().hex[:8]}"
    first = [
        _result("3_1", "#cat", "#pet"),
        _result("3_2", "#cat", "#pet", "#cat"),  # a hashtag twice in one result counts once
        _result("3_3", "#cat"),
        _result("3_4", "#dog", "#pet"),
    ]
    _send(settings, first + [first[0]], garbage=True)  # a repeat, and a record not ours

    run = Trending(settings, app_id, tmp_path / "logs", "first")
    try:
        run.wait_for({"#cat": 3, "#pet": 3, "#dog": 1})
        _wait_committed(settings, app_id)
    finally:
        run.stop()
    assert "skipped" in run.log()

    again = Trending(settings, app_id, tmp_path / "logs", "second")
    try:
        # Nothing is read again (the offsets are committed): this is the changelog's.
        again.wait_for({"#cat": 3, "#pet": 3, "#dog": 1})
        _send(settings, [_result("3_5", "#dog"), first[3]])  # new, and a late repeat
        again.wait_for({"#cat": 3, "#pet": 3, "#dog": 2})
    finally:
        again.stop()
