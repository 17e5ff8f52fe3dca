"""Faults on the embedded broker: kill -9 a process with slow photos in flight, restart it,
and account for every tweet taken in (results, shed records or dead letters; none missing).
"""

from __future__ import annotations

import signal
import time

import pytest

from infra.broker import free_port
from infra.record_producer import RecordProducer
from producers.tweets import tweet_from_stream_line
from schemas.records import now_ms, photos
from tagstream.up import ProcessGroup, child_env, faust_argv
from tests.helpers import KafkaReader, settings_env

pytestmark = pytest.mark.integration


def _tweet(n: int, url: str) -> dict:
    line = {
        "data": {
            "id": f"9{n:05d}",
            "text": f"tweet {n}",
            "attachments": {"media_keys": [f"3_{n}"]},
        },
        "includes": {"media": [{"media_key": f"3_{n}", "type": "photo", "url": url}]},
    }
    return tweet_from_stream_line(line, source="test", ingested_at_ms=now_ms())


def test_kill_9_of_the_faust_worker_with_a_slow_photo_in_flight_loses_nothing(
    make_settings, image_server, tmp_path
) -> None:
    """faust-streaming commits past an offset still in flight when acks come out of order
    (its issue #606); the agent's in-order ack window must keep the slow tweet uncommitted."""
    settings = make_settings(
        topic_partitions=1,
        admission_rate=10_000.0,
        admission_burst=10_000.0,
        fetch_allow_hosts=["127.0.0.1"],
        fetch_read_timeout_s=30.0,
        fetch_retries=0,
        faust_web_port=free_port(),
    )
    slow_n = 5
    tweets = [
        _tweet(
            n,
            f"{image_server}/slow/cats/{n}.jpg?delay=8"
            if n == slow_n
            else f"{image_server}/img/dogs/{n}.jpg",
        )
        for n in range(30)
    ]
    media = {p["media_key"] for t in tweets for p in photos(t)}
    env = child_env(settings_env(settings))
    group = ProcessGroup(env=env, log_dir=tmp_path / "logs")
    reader = KafkaReader(settings, {"images": "ImageEvent", "deadletter": "DeadLetter"})
    try:
        group.start("faust", faust_argv(settings))
        with RecordProducer(settings) as producer:
            for tweet in tweets:
                producer.send("tweets", tweet, key=tweet["id"])
        # Every fast tweet done, the slow one still fetching; then two commit intervals.
        reader.read_until(lambda f: len(f["images"]) >= len(tweets) - 1, timeout_s=90)
        assert f"3_{slow_n}" not in {r["media_key"] for r in reader.found["images"]}
        time.sleep(2.5)
        group.processes["faust"].send_signal(signal.SIGKILL)
        group.processes["faust"].wait()
        group.start("faust", faust_argv(settings))

        def done(found) -> bool:
            seen = {r["media_key"] for r in found["images"]}
            seen |= {r["media_key"] for r in found["deadletter"] if r["media_key"]}
            return seen >= media

        found = reader.read_until(done, timeout_s=90)
    finally:
        reader.close()
        group.stop_all()
    seen = {r["media_key"] for r in found["images"]}
    missing = sorted(media - seen)
    assert not missing, f"lost after kill -9: {missing}"
