"""The inference consumer alone, on the real broker: results, dead letters, committed offsets."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from infra.demo_images import render_demo_jpeg, render_demo_photo_jpeg
from infra.record_producer import RecordProducer
from models.runtime import OnnxClassifier
from processors.decoding import DeviceDecoder
from processors.inference import InferenceConsumer
from schemas import records
from schemas.records import ImageEvent, now_ms
from tests.helpers import KafkaReader

pytestmark = pytest.mark.integration


def image_event(i: int, data: bytes) -> ImageEvent:
    tweet = records.tweet(
        id=f"t{i}",
        text="<b>bold</b> & more",
        source="test",
        ingested_at_ms=now_ms(),
        replay_run_id="run-1",
    )
    photo = records.media(media_key=f"m{i}", type="photo", url=f"http://example.invalid/{i}.jpg")
    return records.image_event(
        tweet=tweet,
        photo=photo,
        position=0,
        content_type="image/jpeg",
        image=data,
        timestamps={"ingested": tweet["ingested_at_ms"]},
    )


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
    classifier = OnnxClassifier(demo_model_dir)
    classes = list(classifier.classes)
    good = {f"m{i}": classes[i % len(classes)] for i in range(40)}
    with RecordProducer(settings) as producer:
        for i in range(40):
            data = render_demo_jpeg(classes[i % len(classes)], 500_000 + i)
            producer.send("images", image_event(i, data), key=f"m{i}")
        corrupt = image_event(40, b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
        producer.send("images", corrupt, key="m40")
        topic = settings.topic("images")
        producer.send_raw(topic, key="m41", value=b"\xc3\x01 not an image event")

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
    assert (sample["provider"], sample["precision"]) == ("cpu", "fp32")
    assert {"consumed", "decoded", "inferred", "produced"} <= set(sample["timestamps"])
    assert abs(sum(sample["scores"].values()) - 1.0) < 1e-3
    stages = {d["media_key"]: d["stage"] for d in found["deadletter"]}
    assert stages == {"m40": "decode_image", None: "decode_image_event"}
    assert found["capacity"][-1]["consumer_id"] == "first"

    # Offsets were committed after delivery: a new member of the group gets nothing to redo.
    second = InferenceConsumer(settings, classifier, consumer_id="second")
    run_until(second, lambda: False, timeout_s=12)
    assert second.stats.images == 0 and second.stats.dead_letters == 0


def test_the_torchvision_decode_path_through_the_consumer(make_settings, demo_model_dir) -> None:
    """The GPU consumer's decoder (a batch at a time, into a torch buffer the model reads in
    place), run with torchvision's CPU decoder: photo-size JPEGs, thumbnails, a bad one."""
    settings = make_settings(batch_max_size=6, model_dir=demo_model_dir, thumbnail_px=48)
    classifier = OnnxClassifier.from_settings(demo_model_dir, settings)
    classes = list(classifier.classes)
    with RecordProducer(settings) as producer:
        for i in range(13):
            data = render_demo_photo_jpeg(classes[i], 510_000 + i)
            producer.send("images", image_event(i, data), key=f"m{i}")
        producer.send("images", image_event(13, b"GIF89a not really"), key="m13")

    def torch_on_cpu(settings, classifier, codec) -> DeviceDecoder:
        return DeviceDecoder(
            classifier, codec, thumbnail_px=settings.thumbnail_px, depth=2, device="cpu"
        )

    consumer = InferenceConsumer(settings, classifier, consumer_id="torch", decoder=torch_on_cpu)
    assert consumer.stats.decode_device == "cpu" and isinstance(consumer.decoder, DeviceDecoder)
    run_until(consumer, lambda: consumer.stats.images + consumer.stats.dead_letters >= 14)
    assert (consumer.stats.images, consumer.stats.dead_letters) == (13, 1)

    reader = KafkaReader(settings, {"hashtags": "HashtagResult", "deadletter": "DeadLetter"})
    found = reader.read_until(lambda f: len(f["hashtags"]) >= 13 and f["deadletter"], timeout_s=30)
    reader.close()
    top = {r["media_key"]: r["top_class"] for r in found["hashtags"]}
    right = sum(top[f"m{i}"] == classes[i] for i in range(13))
    assert right >= 12, top
    thumbnail = found["hashtags"][0]["thumbnail"]
    assert thumbnail and max(Image.open(io.BytesIO(thumbnail)).size) == 48
    (letter,) = found["deadletter"]
    assert (letter["media_key"], letter["stage"]) == ("m13", "decode_image")


def test_a_registry_outage_stops_the_consumer_without_a_dead_letter_or_a_commit(
    make_settings, demo_model_dir, schema_registry
) -> None:
    """With the schema registry answering 503, a consumer stops with
    RegistryUnavailableError (its first capacity report cannot be encoded) before it joins
    the group (when it failed just after joining, the embedded broker kept it a member,
    and the next consumer got nothing) and dead-letters nothing; once the registry is
    back, a restarted consumer classifies every image."""
    from infra.exceptions import RegistryUnavailableError

    settings = make_settings(
        batch_max_size=8, model_dir=demo_model_dir, schema_registry_url=schema_registry.url
    )
    classifier = OnnxClassifier(demo_model_dir)
    classes = list(classifier.classes)
    with RecordProducer(settings) as producer:
        for i in range(12):
            data = render_demo_jpeg(classes[i % len(classes)], 510_000 + i)
            producer.send("images", image_event(i, data), key=f"m{i}")

    schema_registry.down_with = 503
    down = InferenceConsumer(settings, classifier, consumer_id="down")
    with pytest.raises(RegistryUnavailableError, match="answered 503"):
        down.run()
    assert down.stats.images == 0 and down.stats.dead_letters == 0

    schema_registry.down_with = None
    back = InferenceConsumer(settings, classifier, consumer_id="back")
    run_until(back, lambda: back.stats.images + back.stats.dead_letters >= 12)
    assert back.stats.images == 12 and back.stats.dead_letters == 0
    reader = KafkaReader(settings, {"hashtags": "HashtagResult", "deadletter": "DeadLetter"})
    found = reader.read_until(lambda f: len(f["hashtags"]) >= 12, timeout_s=30)
    reader.close()
    assert {r["media_key"] for r in found["hashtags"]} == {f"m{i}" for i in range(12)}
    assert found["deadletter"] == []
