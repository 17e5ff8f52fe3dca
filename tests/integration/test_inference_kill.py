"""kill -9 the inference consumer at random points of a run, restart it, account for every image.

The consumer (`tagstream infer`, a child process) is killed with SIGKILL at a random moment
after it starts producing results, several times, each time with batches being consumed,
decoded, run and delivered; then a last run finishes the topic. After each kill, every
image before the group's committed offsets must have its output on the topics (offsets
are committed only past delivered records), and in the end every image must be a result
or a dead letter (at-least-once: duplicates are possible, counted and printed); none may be
missing.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from infra.demo_images import render_demo_jpeg
from infra.kafka import consumer_config
from infra.record_producer import RecordProducer
from tagstream.up import ProcessGroup, child_env, tagstream_argv
from tests.helpers import KafkaReader, settings_env
from tests.integration.test_inference import image_event

pytestmark = pytest.mark.integration

IMAGES = 900
KILLS = 3
OUTPUTS = {"hashtags": "HashtagResult", "deadletter": "DeadLetter"}


def logs(tmp_path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((tmp_path / "logs").glob("*.log"))
    )


def test_kill_at_random_points_loses_nothing(make_settings, demo_model_dir, tmp_path) -> None:
    settings = make_settings(
        batch_max_size=8,
        model_dir=demo_model_dir,
        commit_interval_ms=200,
        thumbnail_px=0,
        session_timeout_ms=3000,
    )
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    classes = ["cats", "dogs", "cow", "hen", "sheep", "panda"]
    expected = {f"m{i}" for i in range(IMAGES)} | {"bad"}
    with RecordProducer(settings) as producer:
        for i in range(IMAGES):
            data = render_demo_jpeg(classes[i % len(classes)], 800_000 + i % 60)
            producer.send("images", image_event(i, data), key=f"m{i}")
            if i == IMAGES // 2:
                corrupt = image_event(IMAGES, b"\xff\xd8\xff\xe0 truncated")
                producer.send("images", dict(corrupt, media_key="bad"), key="bad")

    # Where each image lies on `images`, to check the committed offsets against.
    images = KafkaReader(settings, {"images": "ImageEvent"})
    placed = images.read_until(lambda f: len(f["images"]) > IMAGES, timeout_s=30)["images"]
    images.close()
    at = {(e["_partition"], e["_offset"]): e["media_key"] for e in placed}
    partitions = sorted({p for p, _ in at})
    group_id = f"{settings.topic_prefix}tagstream-inference"
    committed_reader = Consumer(consumer_config(settings, group_id))
    topic = settings.topic("images")

    reader = KafkaReader(settings, OUTPUTS)
    env = child_env(settings_env(settings))

    def accounted(found) -> set[str]:
        done = {r["media_key"] for r in found["hashtags"]}
        return done | {r["media_key"] for r in found["deadletter"] if r["media_key"]}

    def committed_is_delivered() -> int:
        """Every image before a committed offset has its output on the topics (they were
        acknowledged before the commit; the reader may only need to catch up)."""
        offsets = committed_reader.committed(
            [TopicPartition(topic, p) for p in partitions], timeout=10
        )
        before = {k for (p, o), k in at.items() for tp in offsets if tp.partition == p
                  and o < tp.offset}  # fmt: skip
        found = reader.read_until(lambda f: accounted(f) >= before, timeout_s=15)
        assert accounted(found) >= before, sorted(before - accounted(found))[:20]
        return len(before)

    timeline = []
    try:
        for run in range(KILLS):
            group = ProcessGroup(env=env, log_dir=tmp_path / "logs")
            process = group.start(f"infer-{run}", tagstream_argv("infer"))
            mine = f"-{process.pid}"  # its results carry consumer id <host>-<pid>

            def producing(found, mine=mine) -> bool:
                return any(r["consumer_id"].endswith(mine) for r in found["hashtags"])

            # A random point once it is producing: mid-batch, mid-delivery or mid-commit.
            reader.read_until(producing, timeout_s=60)
            assert process.poll() is None, logs(tmp_path)
            time.sleep(rng.uniform(0.0, 0.6))
            process.send_signal(signal.SIGKILL)
            process.wait()
            group.stop_all()
            timeline.append(committed_is_delivered())
        assert timeline[-1] > 0, "nothing was ever committed"
        assert len(accounted(reader.found)) < len(expected), "a run finished before its kill"

        group = ProcessGroup(env=env, log_dir=tmp_path / "logs")
        final = group.start("infer-final", tagstream_argv("infer"))
        found = reader.read_until(lambda f: accounted(f) >= expected, timeout_s=120)
        assert final.poll() is None, logs(tmp_path)
        group.stop_all()
        found = reader.read_until(lambda f: False, timeout_s=1.0)  # late duplicates, if any
        assert committed_is_delivered() == len(expected)  # the clean stop committed it all
    finally:
        reader.close()
        committed_reader.close()

    results = Counter(r["media_key"] for r in found["hashtags"])
    letters = Counter(r["media_key"] for r in found["deadletter"])
    missing = expected - set(results) - set(letters)
    duplicates = sum(n - 1 for n in results.values()) + sum(n - 1 for n in letters.values())
    print(
        f"\nseed {seed}: {KILLS} kills, images committed after each: {timeline}; "
        f"{len(results)} images with results, {len(letters)} dead letters, "
        f"{duplicates} duplicates, {len(missing)} missing"
    )
    assert not missing, sorted(missing)[:20]
    assert set(letters) == {"bad"} and "bad" not in results
    assert set(results) == expected - {"bad"}
