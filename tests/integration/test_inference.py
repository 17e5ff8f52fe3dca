"""The inference consumer alone, on the real broker: results, dead letters, committed offsets."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import Producer

from infra.demo_images import render_demo_jpeg
from infra.kafka import producer_config
from models.runtime import OnnxClassifier
from processors.inference import InferenceConsumer
from schemas.codec import Codec
from schemas.records import now_ms
from tests.helpers import KafkaReader

pytestmark = pytest.mark.integration


def image_event(i: int, data: bytes) -> dict:
    return {
        "tweet_id": f"t{i}",
        "media_key": f"m{i}",
        "url": f"http://example.invalid/{i}.jpg",
        "position": 0,
        "tweet_text": "<b>bold</b> & more",
        "matching_rules": [],
        "content_type": "image/jpeg",
        "image": data,
        "source": "test",
        "replay_run_id": "run-1",
        "timestamps": {"ingested": now_ms()},
    }


def run_until(consumer: InferenceConsumer, done, *, timeout_s: float = 60.0) -> None:
    stop = threading.Event()

    def on_batch(_: int) -> None:
        if done():
            stop.set()

    thread = threading.Thread(target=consumer.run, kwargs={"stop": stop, "on_batch": on_batch})
    thread.start()
    thread.join(timeout_s)
    stop.set()
    thread.join()


def test_results_dead_letters_and_offsets_committed_after_delivery(
    make_settings, demo_model_dir
) -> None:
    settings = make_settings(batch_max_size=8, model_dir=demo_model_dir)
    codec = Codec.from_settings(settings)
    classifier = OnnxClassifier(demo_model_dir)
    producer = Producer(producer_config(settings))
    topic = settings.topic("images")
    classes = list(classifier.classes)
    good = {f"m{i}": classes[i % len(classes)] for i in range(40)}
    for i in range(40):
        data = render_demo_jpeg(classes[i % len(classes)], 500_000 + i)
        producer.produce(topic, key=f"m{i}", value=codec.encode("ImageEvent", image_event(i, data)))
    corrupt = image_event(40, b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    producer.produce(topic, key="m40", value=codec.encode("ImageEvent", corrupt))
    producer.produce(topic, key="m41", value=b"\xc3\x01 not an image event")
    producer.flush(10)

    first = InferenceConsumer(settings, classifier, consumer_id="first")
    run_until(first, lambda: first.stats.images + first.stats.dead_letters >= 42)
    assert first.stats.images == 40 and first.stats.dead_letters == 2

    reader = KafkaReader(
        settings,
        {"hashtags": "HashtagResult", "deadletter": "DeadLetter", "capacity": "CapacityReport"},
    )
    found = reader.read_until(
        lambda f: len(f["hashtags"]) >= 40 and len(f["deadletter"]) >= 2 and f["capacity"],
        timeout_s=30,
    )
    reader.close()
    results = {r["media_key"]: r for r in found["hashtags"]}
    assert set(results) == set(good)
    right = sum(results[k]["top_class"] == cls for k, cls in good.items())
    assert right >= 36, right
    sample = results["m0"]
    assert sample["tweet_text"] == "<b>bold</b> & more" and sample["replay_run_id"] == "run-1"
    assert (
        sample["consumer_id"] == "first" and sample["model_version"] == classifier.manifest.version
    )
    assert abs(sum(sample["scores"].values()) - 1.0) < 1e-3
    stages = {d["media_key"]: d["stage"] for d in found["deadletter"]}
    assert stages == {"m40": "decode_image", None: "decode_image_event"}
    assert found["capacity"][-1]["consumer_id"] == "first"

    # Offsets were committed after delivery: a new member of the group gets nothing to redo.
    second = InferenceConsumer(settings, classifier, consumer_id="second")
    run_until(second, lambda: False, timeout_s=12)
    assert second.stats.images == 0 and second.stats.dead_letters == 0
