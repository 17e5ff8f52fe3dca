"""`tagstream bench`: throughput figures measured in one run, printed as ratios.

On photos the size tweets carry (1200x900 JPEGs of about 160 KB, `render_demo_photo_jpeg`),
for the 64x64 demo model and for a 224x224 APoZ-pruned static-INT8 ResNet50 (random
weights: its speed is the point):

- ONNX Runtime alone on preprocessed batches (the same session and I/O binding the
  consumer uses; measured before and after the consumer, the mean is the ceiling);
- decode alone (the consumer's decode pool on the same photos, every core);
- the inference consumer through Kafka (the embedded broker unless one is configured),
  between its first and last batch, as a share of ONNX Runtime alone, and of the most the
  cores can give when decode and the model share them (1 / (1/model + 1/decode));
- ours (async fetch, pipelined draft decode, the pruned INT8 model with I/O binding) against
  the ELEN 6889 report's way (blocking fetch one photo at a time, full decode, eager PyTorch,
  dense FP32) at 224x224, on the same photos over HTTP;
- the consumer's peak RSS (a `tagstream infer` process) under a backlog and under ten times
  that backlog: flat, since the batches in flight are bounded.

Timings are never asserted in tests; they are printed here and reported in notes.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer
from PIL import Image

from infra.broker import EmbeddedBroker
from infra.demo_images import DEMO_CLASSES, render_demo_photo_jpeg
from infra.fetcher import ImageFetcher
from infra.image_server import start_image_server
from infra.kafka import consumed, consumer_config
from infra.record_producer import RecordProducer
from infra.settings import Settings
from infra.topics import ensure_topics
from models.demo import ensure_demo_model
from models.resnet import build_resnet50
from models.runtime import OnnxClassifier
from models.variant_bench import pruned_resnet50_variants
from processors.decoding import make_thumbnail
from processors.inference import InferenceConsumer, InferenceStats
from schemas import records
from schemas.records import ImageEvent, now_ms

#: Distinct photos rendered; longer runs cycle through them (decode cost is the same).
UNIQUE_PHOTOS = 64


@dataclass
class Figure:
    name: str
    images: int
    seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time over the same span, all threads

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per image (the broker's excluded)."""
        return 1000 * self.cpu_seconds / self.images if self.images else 0.0

    def line(self) -> str:
        return f"{self.rate:9.1f} images/s  {self.name} ({self.images} in {self.seconds:.2f} s)"


def progress(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def photo_key(i: int) -> tuple[str, int]:
    """The class and seed of photo `i` (UNIQUE_PHOTOS distinct ones, cycled)."""
    n = i % UNIQUE_PHOTOS
    return DEMO_CLASSES[n % len(DEMO_CLASSES)], 300_000 + n


def tweet_photos(count: int) -> list[bytes]:
    """`count` tweet-size JPEGs of the demo classes (UNIQUE_PHOTOS distinct, cycled)."""
    unique = [render_demo_photo_jpeg(*photo_key(i)) for i in range(min(count, UNIQUE_PHOTOS))]
    return [unique[i % len(unique)] for i in range(count)]


def bench_standalone(classifier: OnnxClassifier, images: list[bytes], batch: int) -> Figure:
    """ONNX Runtime alone: batches of preprocessed photos in a preallocated buffer, I/O
    binding, as many images as `images` (the cost does not depend on the pixels)."""
    buffer = classifier.input_buffer(batch)
    for i, data in enumerate(images[:batch]):
        buffer[i] = classifier.preset.from_bytes(data)[0]
    runner = classifier.runner()
    runner.run(buffer)
    sizes = [min(batch, len(images) - s) for s in range(0, len(images), batch)]
    started, cpu = time.perf_counter(), time.process_time()
    for rows in sizes:
        runner.run(buffer[:rows])
    elapsed = time.perf_counter() - started
    return Figure(
        "ONNX Runtime alone, preprocessed batches",
        len(images),
        elapsed,
        time.process_time() - cpu,
    )


def bench_decode(
    classifier: OnnxClassifier, images: list[bytes], workers: int, thumbnail_px: int
) -> Figure:
    """The consumer's decode alone: draft decode, thumbnail and normalise, on `workers`."""
    preset = classifier.preset
    out = classifier.input_buffer(len(images))

    def decode(i: int) -> None:
        image = preset.decode(images[i])
        make_thumbnail(image, thumbnail_px)
        preset.to_array(preset.resize_crop(image), out=out[i])

    with ThreadPoolExecutor(workers) as pool:
        started, cpu = time.perf_counter(), time.process_time()
        list(pool.map(decode, range(len(images))))
        elapsed = time.perf_counter() - started
    return Figure(
        f"decode alone ({workers} threads, with thumbnails)",
        len(images),
        elapsed,
        time.process_time() - cpu,
    )


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


def produce_backlog(settings: Settings, images: list[bytes]) -> Settings:
    """Fresh topics holding `images` as ImageEvents; the settings that name them."""
    settings = settings.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:8]}-"})
    ensure_topics(settings)
    with RecordProducer(settings) as producer:
        for i, data in enumerate(images):
            producer.send("images", _image_event(i, data), key=str(i))
    return settings


def bench_consumer(
    settings: Settings, classifier: OnnxClassifier, images: list[bytes]
) -> tuple[Figure, InferenceStats]:
    """A backlog of `images` on fresh topics, then the consumer timed between its first and
    last batch (the group join and warm-up are start-up, not throughput)."""
    settings = produce_backlog(settings, images)
    consumer = InferenceConsumer(settings, classifier)
    stop = threading.Event()
    marks: list[tuple[float, float, int]] = []

    def on_batch(done: int) -> None:
        marks.append((time.perf_counter(), time.process_time(), consumer.stats.images))
        if consumer.stats.images >= len(images):
            stop.set()

    runner = threading.Thread(target=consumer.run, kwargs={"stop": stop, "on_batch": on_batch})
    runner.start()
    runner.join(timeout=600)
    stop.set()
    runner.join()
    if len(marks) < 2:
        raise RuntimeError("the consumer finished in fewer than two batches: use more images")
    (t0, c0, n0), (t1, c1, n1) = marks[0], marks[-1]
    figure = Figure("inference consumer through Kafka", n1 - n0, t1 - t0, c1 - c0)
    return figure, consumer.stats


@dataclass
class ModelFigures:
    label: str
    alone: Figure
    decode: Figure
    consumer: Figure
    stats: InferenceStats

    @property
    def shared_ceiling(self) -> float:
        """Images/s if decode and the model shared the cores with no overhead at all."""
        return 1.0 / (1.0 / self.alone.rate + 1.0 / self.decode.rate)

    def lines(self) -> list[str]:
        s = self.stats
        return [
            f"{self.label}:",
            "  " + self.alone.line(),
            "  " + self.decode.line(),
            "  " + self.consumer.line(),
            f"    {s.batches} batches of {s.mean_batch:.1f} (closed: {dict(s.closed)}), "
            f"{s.provider} {s.precision}, decode on {s.decode_device}; model stage: ONNX "
            f"Runtime {s.infer_s:.2f} s, waiting for decodes {s.decode_wait_s:.2f} s, for "
            f"batches {s.model_idle_s:.2f} s; delivery {s.deliver_s:.2f} s",
            f"  consumer through Kafka / ONNX Runtime alone: "
            f"{self.consumer.rate / self.alone.rate:.2f}",
            f"  consumer / shared-core ceiling 1/(1/model + 1/decode) = "
            f"{self.shared_ceiling:.1f} images/s: {self.consumer.rate / self.shared_ceiling:.2f}",
            f"  CPU per image: ONNX Runtime alone {self.alone.cpu_ms:.1f} ms, decode "
            f"{self.decode.cpu_ms:.1f} ms, the whole consumer {self.consumer.cpu_ms:.1f} ms "
            f"(on cores they share, the consumer reaches at most "
            f"{self.alone.cpu_ms / self.consumer.cpu_ms:.2f} of ONNX Runtime alone)",
        ]


def bench_model(
    settings: Settings, label: str, classifier: OnnxClassifier, images: list[bytes]
) -> ModelFigures:
    batch = settings.batch_max_size
    progress(f"{label}: ONNX Runtime alone")
    before = bench_standalone(classifier, images, batch)
    progress(f"{label}: decode alone")
    decode = bench_decode(classifier, images, settings.decode_workers, settings.thumbnail_px)
    progress(f"{label}: consumer through Kafka ({len(images)} images)")
    consumer, stats = bench_consumer(settings, classifier, images)
    progress(f"{label}: ONNX Runtime alone again")
    after = bench_standalone(classifier, images, batch)
    # Measured on either side of the consumer: two shared cores drift.
    alone = Figure(
        "ONNX Runtime alone, preprocessed batches (mean before/after)",
        before.images + after.images,
        before.seconds + after.seconds,
        before.cpu_seconds + after.cpu_seconds,
    )
    return ModelFigures(label, alone, decode, consumer, stats)


def classify_pipelined(classifier: OnnxClassifier, datas: list[bytes], workers: int) -> None:
    """Ours without Kafka: draft decode on a pool into two alternating preallocated buffers,
    the next batch decoding while the model runs this one (I/O binding)."""
    preset, batch = classifier.preset, classifier.max_batch
    buffers = [classifier.input_buffer(), classifier.input_buffer()]
    runner = classifier.runner()

    def decode(data: bytes, row: np.ndarray) -> None:
        preset.to_array(preset.resize_crop(preset.decode(data)), out=row)

    with ThreadPoolExecutor(workers) as pool:
        chunks = [datas[s : s + batch] for s in range(0, len(datas), batch)]

        def submit(k: int) -> list:
            buffer = buffers[k % 2]
            return [pool.submit(decode, d, buffer[i]) for i, d in enumerate(chunks[k])]

        pending = submit(0)
        for k, chunk in enumerate(chunks):
            for future in pending:
                future.result()
            pending = submit(k + 1) if k + 1 < len(chunks) else []
            runner.run(buffers[k % 2][: len(chunk)])


def bench_fetch_paths(
    classifier: OnnxClassifier,
    urls: list[str],
    baseline_urls: list[str],
    workers: int,
) -> tuple[Figure, Figure]:
    """Ours (async fetch, pipelined draft decode, pruned INT8 with I/O binding) vs the
    report's way (blocking fetch, full decode, eager PyTorch dense FP32) at 224x224."""

    async def fetch_all() -> list[bytes]:
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
        return [f.data for f in fetched]

    started = time.perf_counter()
    classify_pipelined(classifier, asyncio.run(fetch_all()), workers)
    ours = Figure(
        "ours: async fetch + pipelined draft decode + pruned INT8 ONNX Runtime",
        len(urls),
        time.perf_counter() - started,
    )

    size = classifier.manifest.input_size
    torch.manual_seed(0)
    model = build_resnet50(len(classifier.classes), weights=None).eval()
    mean = torch.tensor(classifier.manifest.mean).view(3, 1, 1)
    std = torch.tensor(classifier.manifest.std).view(3, 1, 1)
    batch = classifier.max_batch
    started = time.perf_counter()
    tensors = []
    # As the ELEN 6889 report did: one blocking request at a time, full decode, resize,
    # and the dense FP32 network in eager PyTorch.
    for url in baseline_urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            image = Image.open(io.BytesIO(response.read())).convert("RGB")
        image = image.resize((size, size))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        tensors.append((torch.from_numpy(array) - mean) / std)
    with torch.no_grad():
        for start in range(0, len(tensors), batch):
            model(torch.stack(tensors[start : start + batch]))
    baseline = Figure(
        "ELEN 6889 report-style: blocking fetch + full decode + eager PyTorch dense FP32",
        len(baseline_urls),
        time.perf_counter() - started,
    )
    return ours, baseline


def _rss_kb(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of `pid` in KiB, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass
class RssRun:
    backlog: int
    samples: list[tuple[int, float]]  # (results so far, RSS in MiB)

    @property
    def peak(self) -> float:
        return max(rss for _, rss in self.samples)

    def peak_until(self, share: float) -> float:
        """Peak RSS while the first `share` of the backlog was being worked through."""
        return max(rss for done, rss in self.samples if done <= share * self.backlog)


def rss_under_backlog(settings: Settings, model_dir: Path, images: list[bytes]) -> RssRun:
    """The RSS of a `tagstream infer` process working through `images` as a backlog,
    sampled against its progress."""
    settings = produce_backlog(settings, images)
    env = {
        **os.environ,
        "TAGSTREAM_KAFKA_BOOTSTRAP": settings.bootstrap(),
        "TAGSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "TAGSTREAM_MODEL_DIR": str(Path(model_dir).resolve()),
        "TAGSTREAM_DATA_DIR": str(settings.data_dir.resolve()),
        "TAGSTREAM_BATCH_MAX_SIZE": str(settings.batch_max_size),
        "TAGSTREAM_PIPELINE_DEPTH": str(settings.pipeline_depth),
    }
    counter = Consumer(consumer_config(settings, f"bench-count-{uuid.uuid4().hex[:8]}"))
    counter.subscribe([settings.topic("hashtags")])
    child = subprocess.Popen(
        [sys.executable, "-m", "tagstream.cli", "infer"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples: list[tuple[int, float]] = []
    done = 0
    deadline = time.monotonic() + 600
    try:
        while done < len(images) and time.monotonic() < deadline:
            done += len(consumed(counter, 1000, 0.2))
            if child.poll() is not None:
                raise RuntimeError(f"tagstream infer exited ({child.returncode})")
            samples.append((done, _rss_kb(child.pid)[0] / 1024))
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        counter.close()
    return RssRun(len(images), samples)


def run_bench(settings: Settings, *, images: int = 512, backlog: int = 200) -> int:
    """All the figures above, each measured in this one run."""
    started = time.monotonic()
    progress(f"rendering {min(images, UNIQUE_PHOTOS)} tweet-size photos (1200x900 JPEG)")
    photos = tweet_photos(max(images, backlog * 10))
    mean_kb = np.mean([len(p) for p in photos[:UNIQUE_PHOTOS]]) / 1000
    demo_dir = Path(settings.model_dir or ensure_demo_model(settings.data_dir))
    progress("building (once) the 224x224 pruned INT8 ResNet50 (random weights)")
    pruned_dir = pruned_resnet50_variants(
        settings.data_dir / "models" / "bench-resnet50-pruned50-224"
    )["int8"]
    broker = None
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        demo = OnnxClassifier.from_settings(demo_dir, settings)
        pruned = OnnxClassifier.from_settings(pruned_dir, settings)
        print(
            f"{images} photos of 1200x900 (JPEG, {mean_kb:.0f} KB mean), batch "
            f"{settings.batch_max_size}, pipeline depth {settings.pipeline_depth}, "
            f"{settings.decode_workers} decode threads, {os.cpu_count()} cores",
            flush=True,
        )
        figures = [
            bench_model(
                settings, f"demo model {demo.manifest.name} (64x64)", demo, photos[:images]
            ),
            bench_model(settings, "pruned INT8 ResNet50 (224x224)", pruned, photos[:images]),
        ]

        progress("ours vs the ELEN 6889 report's way, over HTTP")
        runner, base = asyncio.run_coroutine_threadsafe(start_image_server(), loop).result(30)
        try:
            urls = [f"{base}/photo/{c}/{seed}.jpg" for c, seed in map(photo_key, range(images))]
            for url in urls[:UNIQUE_PHOTOS]:  # the server renders on first request
                urllib.request.urlopen(url, timeout=30).read()
            ours, seed = bench_fetch_paths(
                pruned, urls, urls[: max(32, images // 4)], settings.decode_workers
            )
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)

        progress(f"peak RSS of `tagstream infer` under a backlog of {backlog}, then {backlog * 10}")
        small = rss_under_backlog(settings, demo_dir, photos[:backlog])
        large = rss_under_backlog(settings, demo_dir, photos[: backlog * 10])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        if broker is not None:
            broker.stop()

    print()
    for model in figures:
        print("\n".join(model.lines()))
    print()
    print(ours.line())
    print(seed.line())
    print(
        f"ours / report-style baseline at 224x224 (fetch+decode+infer): "
        f"{ours.rate / seed.rate:.1f}x"
    )
    consumer_224 = figures[1].consumer
    print(
        f"consumer through Kafka (pruned INT8, 224) / report-style baseline: "
        f"{consumer_224.rate / seed.rate:.1f}x"
    )
    print()
    print(
        f"peak RSS of tagstream infer: {small.peak:.0f} MiB under a backlog of {backlog} "
        f"photos, {large.peak:.0f} MiB under {backlog * 10} ({large.peak / small.peak:.2f}x); "
        "through the larger one: "
        + ", ".join(f"{large.peak_until(q):.0f}" for q in (0.1, 0.25, 0.5, 1.0))
        + " MiB at 10/25/50/100% done"
    )
    print(f"bench took {time.monotonic() - started:.0f} s")
    return 0
