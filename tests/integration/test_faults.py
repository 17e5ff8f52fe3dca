"""Faults on the embedded broker, with slow photos in flight at the moment of each fault.

kill -9 of each long-running process (the Faust worker, the inference consumer, the sink,
the producer) at two points of a steady stream, each followed by a restart; then every
tweet taken in must end as results, a shed record or dead letters: none missing (the
missing ids are listed when one is), duplicates counted and reported.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from infra.broker import EmbeddedBroker, free_port
from infra.record_producer import RecordProducer
from infra.settings import Settings
from infra.topics import ensure_topics
from producers.tweets import tweet_from_stream_line
from schemas.records import now_ms, photos
from tagstream.up import ProcessGroup, child_env, faust_argv
from tests.helpers import KafkaReader, settings_env
from tests.pipeline import Ledger, RunningPipeline

pytestmark = pytest.mark.integration

#: Synthetic tweets of each kill run, and their rate.
STREAM = 300
RATE = 25.0


def _tweet(n: int, url: str) -> dict:
    line = {
        "data": {"id": f"9{n:05d}", "text": f"t {n}", "attachments": {"media_keys": [f"3_{n}"]}},
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
        admission_mode="fixed",  # no inference consumer here: every photo admitted
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


@pytest.mark.parametrize("victim", ["faust", "infer", "sink", "producer"])
def test_kill_9_at_two_points_of_a_steady_stream_then_restart_loses_nothing(
    victim, make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    settings = make_settings(
        admission_rate=10_000.0,
        admission_burst=10_000.0,
        fetch_allow_hosts=["127.0.0.1"],
        fetch_read_timeout_s=6.0,
        fetch_retries=0,
        model_dir=demo_model_dir,
        faust_web_port=free_port(),
        sink_port=free_port(),
        sink_window_s=1.0,
        sink_dir=tmp_path / "sink",
    )
    ledger = Ledger(settings)
    injected = 0

    def slow_photos_in_flight() -> None:
        # A few photos whose host answers after 4 s: in flight at the moment of the fault.
        nonlocal injected
        with RecordProducer(settings) as producer:
            for _ in range(3):
                tweet = _tweet(
                    50_000 + injected, f"{image_server}/slow/cows/{injected}.jpg?delay=4"
                )
                producer.send("tweets", tweet, key=tweet["id"])
                injected += 1
        time.sleep(1.0)

    with RunningPipeline(settings, tmp_path / "logs") as pipeline:

        def healthy() -> None:
            # Only the producer may end, once it has produced its stream.
            ended = {n: c for n, c in pipeline.exited().items() if (n, c) != ("producer", 0)}
            assert not ended, (ended, pipeline.logs())

        pipeline.start("faust")
        pipeline.start("infer", "infer")
        pipeline.start("sink", "sink")
        pipeline.start(
            "producer",
            "produce", "synthetic", "--rate", str(RATE), "--count", str(STREAM), "--seed", "11",
            "--image-base-url", image_server, "--state", str(tmp_path / "synthetic.json"),
        )  # fmt: skip
        for point in (STREAM // 4, STREAM * 2 // 3):
            deadline = time.monotonic() + 90
            while len(ledger.tweets) < point and time.monotonic() < deadline:
                ledger.read(0.5)
                healthy()
            assert len(ledger.tweets) >= point, pipeline.logs()
            slow_photos_in_flight()
            pipeline.kill(victim)
            pipeline.restart(victim)
        acc = ledger.settle(want_tweets=STREAM + injected, timeout_s=150, check=healthy)
        sink_log = pipeline.log_of("sink")
    ledger.close()
    print(f"\nkill -9 {victim} x{pipeline.kills[victim]}: {acc.line()}")
    assert acc.tweets_in == STREAM + injected, (acc.line(), pipeline.logs())
    assert not acc.missing_tweets and not acc.missing_photos, (
        f"lost: tweets {acc.missing_tweets[:20]}, photos {acc.missing_photos[:20]}; {acc.line()}"
    )
    if victim == "sink":
        # The restarted sink goes on sampling where the killed one stopped.
        samples = (tmp_path / "sink" / "samples.jsonl").read_text().splitlines()
        assert samples and sink_log.count("gallery: http") == 3


def _plain_settings(tmp_path):
    """Settings like `make_settings` gives, for a broker that is not there yet."""

    def make(**values) -> Settings:
        return Settings(
            **{
                "topic_prefix": f"t{uuid.uuid4().hex[:10]}-",
                "data_dir": tmp_path / "data",
                "session_timeout_ms": 6000,
                "topic_partitions": 2,
            }
            | values
        )

    return make


def _pipeline_settings(make_settings, tmp_path, demo_model_dir, **overrides):
    return make_settings(
        **{
            "admission_rate": 10_000.0,
            "admission_burst": 10_000.0,
            "fetch_allow_hosts": ["127.0.0.1"],
            "fetch_read_timeout_s": 6.0,
            "fetch_retries": 0,
            "model_dir": demo_model_dir,
            "faust_web_port": free_port(),
            "sink_port": free_port(),
            "sink_dir": tmp_path / "sink",
        }
        | overrides
    )


def _start_all(pipeline: RunningPipeline, image_server: str, *, count: int, rate: float) -> None:
    pipeline.start("faust")
    pipeline.start("infer", "infer")
    pipeline.start("sink", "sink")
    pipeline.start(
        "producer",
        "produce", "synthetic", "--rate", str(rate), "--count", str(count), "--seed", "5",
        "--image-base-url", image_server,
    )  # fmt: skip


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which it may stop, stall or start late."""
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log")
    yield broker
    if broker.alive():
        os.kill(broker.pid, signal.SIGCONT)
    broker.stop()


def test_a_stalled_broker_is_ridden_out_with_one_line_per_process(
    own_broker, make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    """SIGSTOP of the broker for longer than the session timeout, then SIGCONT: every
    process says so once, resumes by itself, and nothing is lost."""
    own_broker.start()
    settings = _pipeline_settings(
        make_settings, tmp_path, demo_model_dir, kafka_bootstrap=own_broker.bootstrap
    )
    count, stall_s = 250, 12.0
    assert stall_s > settings.session_timeout_ms / 1000
    ledger = Ledger(settings)
    with RunningPipeline(settings, tmp_path / "logs") as pipeline:
        _start_all(pipeline, image_server, count=count, rate=10.0)
        deadline = time.monotonic() + 90
        while len(ledger.tweets) < 60 and time.monotonic() < deadline:
            ledger.read(0.5)
        assert len(ledger.tweets) >= 60, pipeline.logs()
        os.kill(own_broker.pid, signal.SIGSTOP)
        time.sleep(stall_s)
        os.kill(own_broker.pid, signal.SIGCONT)
        acc = ledger.settle(want_tweets=count, timeout_s=150)
        logs = {name: pipeline.log_of(name) for name in ("faust", "infer", "sink", "producer")}
        ended = pipeline.exited()
    ledger.close()
    print(f"\nbroker stalled {stall_s:g} s: {acc.line()}")
    assert ended == {"producer": 0} or not ended, ended
    assert acc.tweets_in == count and acc.lost == 0, (acc.line(), acc.missing_photos[:20])
    for name, text in logs.items():
        if name == "producer" and "is not answering" not in text:
            continue  # it may have produced its stream before the stall
        assert text.count("is not answering") == 1, (name, text[-3000:])
        assert text.count("answers again") == 1, (name, text[-3000:])
        assert "Traceback" not in text, (name, text[-3000:])


def test_processes_started_before_the_broker_wait_then_work(
    own_broker, make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    settings = _pipeline_settings(
        _plain_settings(tmp_path), tmp_path, demo_model_dir, kafka_bootstrap=own_broker.bootstrap
    )
    ledger = None
    with RunningPipeline(settings, tmp_path / "logs") as pipeline:
        _start_all(pipeline, image_server, count=40, rate=20.0)
        time.sleep(6.0)  # every process is up and waiting
        assert not pipeline.exited(), pipeline.logs()
        own_broker.start()
        ensure_topics(settings)
        ledger = Ledger(settings)
        acc = ledger.settle(want_tweets=40, timeout_s=120)
        logs = {name: pipeline.log_of(name) for name in ("faust", "infer", "sink", "producer")}
    ledger.close()
    assert acc.tweets_in == 40 and acc.lost == 0, (acc.line(), logs)
    for name, text in logs.items():
        assert text.count("waiting for Kafka at") == 1, (name, text[-3000:])
        assert "answered after" in text and "Traceback" not in text, (name, text[-3000:])


def test_processes_without_a_broker_stop_with_one_clear_error(
    make_settings, demo_model_dir, tmp_path
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    settings = _pipeline_settings(
        _plain_settings(tmp_path), tmp_path, demo_model_dir, kafka_bootstrap=nowhere,
        broker_wait_s=3.0,
    )  # fmt: skip
    with RunningPipeline(settings, tmp_path / "logs") as pipeline:
        started = time.monotonic()
        _start_all(pipeline, "http://127.0.0.1:9", count=10, rate=10.0)
        codes = {n: p.wait(timeout=60) for n, p in pipeline.group.processes.items()}
        took = time.monotonic() - started
        logs = {name: pipeline.log_of(name) for name in codes}
    assert codes == dict.fromkeys(codes, 1), (codes, logs)
    assert took < 30, took
    for name, text in logs.items():
        assert f"error: Kafka at {nowhere} did not answer within 3 s" in text, (name, text)
        assert text.count("waiting for Kafka at") == 1 and "Traceback" not in text, (name, text)
