"""`tagstream bench`: throughput figures measured in one run, printed as ratios.

- standalone ONNX Runtime on preprocessed batches: the ceiling for this model here;
- the inference consumer on the same images through Kafka (decode pool, batching,
  produce, commit-after-delivery), as a share of that ceiling;
- our fetch + decode + inference path against the ELEN 6889 report's way (blocking
  fetch one image at a time, full decode, eager PyTorch) on the same URLs.

Timings are never asserted in tests; they are printed here and reported in notes.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infra.broker import EmbeddedBroker
from infra.demo_images import render_demo_jpeg
from infra.fetcher import ImageFetcher
from infra.image_server import start_image_server
from infra.record_producer import RecordProducer
from infra.settings import Settings
from infra.topics import ensure_topics
from models.demo import TRAIN_SEEDS_START, ensure_demo_model
from models.quantize import make_variant
from models.resnet import build_resnet50
from models.runtime import OnnxClassifier
from processors.inference import InferenceConsumer
from schemas import records
from schemas.records import ImageEvent, now_ms


@dataclass
class Figure:
    name: str
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def bench_standalone(classifier, images: list[bytes], batch: int) -> Figure:
    arrays = np.stack([classifier.preset.from_bytes(data)[0] for data in images])
    classifier.warm_up((batch,))
    started = time.perf_counter()
    for start in range(0, len(arrays), batch):
        classifier.probabilities(arrays[start : start + batch])
    elapsed = time.perf_counter() - started
    return Figure("ONNX Runtime alone, preprocessed batches", len(arrays), elapsed)


def _image_event(i: int, data: bytes) -> ImageEvent:
    tweet = records.tweet(id=str(i), text="", source="bench", ingested_at_ms=now_ms())
    photo = records.media(media_key=f"bench_{i}", type="photo", url=f"bench://{i}")
    return records.image_event(
        tweet=tweet,
        photo=photo,
        position=0,
        content_type="image/jpeg",
        image=data,
        timestamps={"ingested": tweet["ingested_at_ms"]},
    )


def bench_consumer(settings: Settings, classifier, images: list[bytes]) -> Figure:
    """Produce ImageEvents to fresh topics, then time the consumer between its first and last batch.

    The group join and warm-up are excluded: they are start-up, not throughput.
    """

    settings = settings.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:8]}-"})
    ensure_topics(settings)
    with RecordProducer(settings) as producer:
        for i, data in enumerate(images):
            producer.send("images", _image_event(i, data), key=str(i))

    consumer = InferenceConsumer(settings, classifier)
    stop = threading.Event()
    marks: list[tuple[float, int]] = []

    def on_batch(done: int) -> None:
        marks.append((time.perf_counter(), consumer.stats.images))
        if consumer.stats.images >= len(images):
            stop.set()

    runner = threading.Thread(target=consumer.run, kwargs={"stop": stop, "on_batch": on_batch})
    runner.start()
    runner.join(timeout=600)
    stop.set()
    runner.join()
    if len(marks) < 2:
        raise RuntimeError("the consumer finished in fewer than two batches: use more images")
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    stats = consumer.stats
    print(
        f"consumer time: decode+resize+thumbnail {stats.decode_s:.2f} s, ONNX Runtime "
        f"{stats.infer_s:.2f} s, produce+flush+commit {stats.deliver_s:.2f} s "
        f"({stats.batches} batches, {stats.images / stats.batches:.1f} images each)",
        flush=True,
    )
    return Figure(
        "inference consumer through Kafka (decode, batch, produce, commit)", n1 - n0, t1 - t0
    )


def bench_fetch_paths(
    classifier, checkpoint: Path, urls: list[str], batch: int
) -> tuple[Figure, Figure]:
    """Ours (async fetch, draft decode pool, ONNX Runtime) vs the report's way on the same URLs."""

    async def ours() -> None:
        async with ImageFetcher(
            concurrency=32,
            per_host=32,
            connect_timeout_s=2,
            read_timeout_s=5,
            max_bytes=8_000_000,
            retries=0,
            allow_hosts=["127.0.0.1"],
        ) as fetcher:
            fetched = await asyncio.gather(*(fetcher.fetch(u) for u in urls))
        loop = asyncio.get_running_loop()
        arrays = await asyncio.gather(
            *(
                loop.run_in_executor(None, lambda d=f.data: classifier.preset.from_bytes(d)[0])
                for f in fetched
            )
        )
        for start in range(0, len(arrays), batch):
            classifier.probabilities(np.stack(arrays[start : start + batch]))

    started = time.perf_counter()
    asyncio.run(ours())
    ours_figure = Figure(
        "ours: async fetch + draft decode pool + ONNX Runtime",
        len(urls),
        time.perf_counter() - started,
    )

    model = build_resnet50(len(classifier.classes))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    model.eval()
    size = classifier.manifest.input_size
    mean = torch.tensor(classifier.manifest.mean).view(3, 1, 1)
    std = torch.tensor(classifier.manifest.std).view(3, 1, 1)
    started = time.perf_counter()
    tensors = []
    # As the ELEN 6889 report did: one blocking request at a time, full decode, resize.
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            image = Image.open(io.BytesIO(response.read())).convert("RGB")
        image = image.resize((size, size))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        tensors.append((torch.from_numpy(array) - mean) / std)
    with torch.no_grad():
        for start in range(0, len(tensors), batch):
            model(torch.stack(tensors[start : start + batch]))
    seed_figure = Figure(
        "ELEN 6889 report-style: blocking fetch + full decode + eager PyTorch",
        len(urls),
        time.perf_counter() - started,
    )
    return ours_figure, seed_figure


def int8_variant(settings: Settings, model_dir: Path, classifier):
    """The model's INT8 variant, calibrated on demo training images; cached beside the model."""

    out = model_dir.with_name(model_dir.name + "-int8")
    if not (out / "manifest.json").is_file():
        calibration = [
            np.stack(
                [
                    classifier.preset.from_bytes(render_demo_jpeg(name, TRAIN_SEEDS_START + n))[0]
                    for n in range(8)
                ]
            )
            for name in classifier.classes
        ]
        make_variant(model_dir, out, "int8", calibration=calibration)
    return OnnxClassifier(
        out, provider=settings.ort_provider, intra_op_threads=settings.ort_intra_op_threads
    )


def run_bench(settings: Settings, *, images: int = 512) -> int:

    model_dir = settings.model_dir or ensure_demo_model(settings.data_dir)
    classifier = OnnxClassifier(
        model_dir, provider=settings.ort_provider, intra_op_threads=settings.ort_intra_op_threads
    )
    classes = classifier.classes
    picks = [(classes[i % len(classes)], 300_000 + i) for i in range(images)]
    jpegs = [render_demo_jpeg(name, seed) for name, seed in picks]
    batch = settings.batch_max_size
    print(
        f"model {classifier.manifest.name} ({classifier.manifest.input_size}px) on "
        f"{classifier.providers[0]}, batch {batch}, {images} images of 160px JPEG",
        flush=True,
    )

    standalone = bench_standalone(classifier, jpegs, batch)
    int8 = bench_standalone(int8_variant(settings, Path(model_dir), classifier), jpegs, batch)
    int8.name = "ONNX Runtime alone, INT8 (static QDQ) variant"
    broker = None
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    try:
        consumer = bench_consumer(settings, classifier, jpegs)
    finally:
        if broker is not None:
            broker.stop()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, base = asyncio.run_coroutine_threadsafe(start_image_server(), loop).result(30)
    try:
        urls = [f"{base}/img/{name}/{seed}.jpg" for name, seed in picks[:256]]
        for url in urls:  # the server renders on first request: warm its cache for both
            urllib.request.urlopen(url, timeout=5).read()
        ours, seed = bench_fetch_paths(classifier, Path(model_dir) / "checkpoint.pt", urls, batch)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)

    print()
    for figure in (standalone, int8, consumer, ours, seed):
        print(
            f"{figure.rate:9.1f} images/s  {figure.name}"
            f" ({figure.images} in {figure.seconds:.2f} s)"
        )
    print()
    print(f"consumer through Kafka / ONNX Runtime alone: {consumer.rate / standalone.rate:.2f}")
    print(f"INT8 / FP32, ONNX Runtime alone: {int8.rate / standalone.rate:.2f}")
    print(f"ours / report-style baseline (fetch+decode+infer): {ours.rate / seed.rate:.2f}")
    return 0
