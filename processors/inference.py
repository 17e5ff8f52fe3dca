"""The inference consumer: `images` in; `hashtags`, `deadletter` and `capacity` out.

A plain confluent-kafka consumer in the group `<prefix>tagstream-inference`, one
process per GPU (or CPU box). It assembles batches (at most `batch_max_size`
images, waiting at most `batch_max_wait_ms` after the first), decodes and
resizes them in a thread pool (Pillow releases the GIL while decoding, and
`draft()` lets libjpeg decode at a reduced scale), runs ONNX Runtime, and maps
scores to hashtags with the manifest's classes and thresholds.

Delivery guarantee: at-least-once. Offsets are committed only after every
record the batch produced (results and dead letters) has been acknowledged by
the broker; a crash before that re-delivers the batch, and results are keyed
by tweet id (and carry the media key) so a duplicate is harmless.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition
from PIL import Image

from infra.exceptions import CodecError, DecodeImageError
from infra.kafka import commit, consumed, consumer_config
from infra.record_producer import RecordProducer, SourceRef
from infra.settings import Settings
from models.runtime import OnnxClassifier
from schemas.records import HashtagResult, ImageEvent, capacity_report, hashtag_result, now_ms

log = logging.getLogger(__name__)

#: Seconds between two capacity reports: the admission controller's sampling period.
REPORT_INTERVAL_S = 1.0


class CapacityMeter:
    """Images per busy second: what this consumer can take, measured on its own batches.

    An exponentially weighted mean over busy time (not wall time: an idle consumer has
    not lost capacity), with a time constant of `tau_s` busy seconds."""

    def __init__(self, *, initial: float = 0.0, tau_s: float = 2.0) -> None:
        self.rate = initial
        self.tau_s = tau_s

    def add(self, images: int, busy_s: float) -> None:
        if images <= 0 or busy_s <= 0:
            return
        weight = 1.0 - math.exp(-busy_s / self.tau_s)
        measured = images / busy_s
        self.rate = measured if self.rate <= 0 else self.rate + weight * (measured - self.rate)


@dataclass
class Prepared:
    """One consumed image, decoded and ready for the model (or failed)."""

    message: Any
    event: ImageEvent | None = None
    array: np.ndarray | None = None
    thumbnail: bytes | None = None
    error: BaseException | None = None
    stage: str = ""
    timestamps: dict[str, float] = field(default_factory=dict)


@dataclass
class InferenceStats:
    images: int = 0
    dead_letters: int = 0
    batches: int = 0
    busy_s: float = 0.0
    decode_s: float = 0.0
    infer_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def deliver_s(self) -> float:
        """Busy time not spent decoding or in ONNX Runtime: produce, flush and commit."""
        return self.busy_s - self.decode_s - self.infer_s

    @property
    def images_per_busy_s(self) -> float:
        return self.images / self.busy_s if self.busy_s else 0.0


def make_thumbnail(image: Image.Image, edge: int) -> bytes | None:
    if edge <= 0:
        return None
    thumb = image.copy()
    thumb.thumbnail((edge, edge))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


class InferenceConsumer:
    """Consume ImageEvents, classify them in batches, produce HashtagResults."""

    def __init__(
        self,
        settings: Settings,
        classifier: OnnxClassifier,
        *,
        group_id: str | None = None,
        consumer_id: str | None = None,
    ) -> None:

        self.settings = settings
        self.classifier = classifier
        self.consumer_id = (
            consumer_id or settings.consumer_id or f"{socket.gethostname()}-{os.getpid()}"
        )
        self.group_id = group_id or f"{settings.topic_prefix}tagstream-inference"
        self.images_topic = settings.topic("images")
        self.consumer = Consumer(consumer_config(settings, self.group_id))
        self.producer = RecordProducer(settings)
        self.codec = self.producer.codec
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self.stats = InferenceStats()
        self.capacity = CapacityMeter()
        self._last_report = time.monotonic()
        self._report_images = 0
        self._report_batches = 0

    # -- batching ------------------------------------------------------------------
    def next_batch(self, *, idle_timeout_s: float) -> list:
        """Up to `batch_max_size` messages; waits `batch_max_wait_ms` at most after the first."""
        max_size = self.settings.batch_max_size
        messages = consumed(self.consumer, max_size, idle_timeout_s)
        if messages:
            deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000.0
            while len(messages) < max_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                messages.extend(consumed(self.consumer, max_size - len(messages), left))
        return messages

    # -- per image -------------------------------------------------------------------
    def prepare(self, message) -> Prepared:
        prepared = Prepared(message, timestamps={"consumed": now_ms()})
        try:
            event = self.codec.decode("ImageEvent", message.value())
        except CodecError as exc:
            prepared.error, prepared.stage = exc, "decode_image_event"
            return prepared
        prepared.event = event
        try:
            image = self.classifier.preset.decode(event["image"])
            prepared.thumbnail = make_thumbnail(image, self.settings.thumbnail_px)
            prepared.array = self.classifier.preset(image)
        except DecodeImageError as exc:
            prepared.error, prepared.stage = exc, "decode_image"
        prepared.timestamps["decoded"] = now_ms()
        return prepared

    def result_for(
        self, prepared: Prepared, probabilities: np.ndarray, inferred: float
    ) -> HashtagResult:
        event = prepared.event
        assert event is not None
        manifest = self.classifier.manifest
        scores = {name: float(p) for name, p in zip(manifest.classes, probabilities, strict=True)}
        return hashtag_result(
            event=event,
            hashtags=manifest.hashtags(scores),
            top_class=manifest.classes[int(np.argmax(probabilities))],
            scores=scores,
            model_id=manifest.model_id,
            model_version=manifest.version,
            consumer_id=self.consumer_id,
            thumbnail=prepared.thumbnail,
            timestamps=prepared.timestamps | {"inferred": inferred, "produced": now_ms()},
        )

    def _dead_letter(self, prepared: Prepared) -> None:
        message, event = prepared.message, prepared.event
        self.producer.dead_letter(
            SourceRef.of(message),
            prepared.stage,
            prepared.error or RuntimeError("unknown"),
            tweet_id=event["tweet_id"] if event else None,
            media_key=event["media_key"] if event else None,
            url=event["url"] if event else None,
            payload=message.value() if prepared.stage == "decode_image_event" else None,
        )
        self.stats.dead_letters += 1

    # -- per batch -------------------------------------------------------------------
    def process(self, messages: list) -> int:
        """Classify one batch, deliver its output, then commit its offsets. Returns images done."""

        started = time.monotonic()
        prepared = list(self.pool.map(self.prepare, messages))
        decoded = time.monotonic()
        ready = [p for p in prepared if p.error is None]
        for failed in (p for p in prepared if p.error is not None):
            self._dead_letter(failed)
        if ready:
            probabilities = self.classifier.probabilities(np.stack([p.array for p in ready]))
            inferred = now_ms()
            self.stats.infer_s += time.monotonic() - decoded
            for p, row in zip(ready, probabilities, strict=True):
                assert p.event is not None
                result = self.result_for(p, row, inferred)
                self.producer.send("hashtags", result, key=p.event["tweet_id"])
        # Raises when a record is undelivered: then nothing is committed.
        self.producer.flush(30)
        last: dict[tuple[str, int], int] = {}
        for message in messages:
            last[(message.topic(), message.partition())] = message.offset()
        commit(self.consumer, [TopicPartition(t, p, o + 1) for (t, p), o in last.items()])
        self.stats.images += len(ready)
        throttle = self.settings.infer_throttle_images_per_s
        if throttle:  # a slower device, simulated (tests, demos)
            time.sleep(max(0.0, len(messages) / throttle - (time.monotonic() - started)))
        self.stats.batches += 1
        busy = time.monotonic() - started
        self.stats.busy_s += busy
        self.capacity.add(len(messages), busy)
        self.stats.decode_s += decoded - started
        self._report_images += len(ready)
        self._report_batches += 1
        return len(ready)

    def report_capacity(self, *, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._last_report
        if not force and elapsed < REPORT_INTERVAL_S:
            return
        report = capacity_report(
            consumer_id=self.consumer_id,
            images_per_s=self.capacity.rate,
            batch_size=self._report_images / self._report_batches if self._report_batches else 0,
            queue_depth=self.lag(),
        )
        self.producer.send("capacity", report, key=self.consumer_id)
        self._last_report, self._report_images, self._report_batches = now, 0, 0

    def _first_estimate(self) -> float:
        """Capacity before any image: one full batch of the model alone, less a share
        for decoding; the meter corrects it from the first real batches on."""
        size, edge = self.settings.batch_max_size, self.classifier.manifest.input_size
        batch = np.zeros((size, 3, edge, edge), dtype=np.float32)
        started = time.monotonic()
        self.classifier.probabilities(batch)
        estimate = 0.7 * size / max(time.monotonic() - started, 1e-6)
        throttle = self.settings.infer_throttle_images_per_s
        return min(estimate, throttle) if throttle else estimate

    def lag(self) -> int:
        total = 0
        try:
            for tp in self.consumer.assignment():
                low, high = self.consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                (position,) = self.consumer.position([tp])
                offset = position.offset if position.offset >= 0 else low
                total += max(0, high - offset)
        except Exception as exc:  # lag is advisory; never stop inference over it
            log.debug("lag unavailable: %s", exc)
        return total

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        idle_timeout_s: float = 0.5,
        on_batch: Callable[[int], None] | None = None,
    ) -> InferenceStats:
        """Warm up, join the group and process until `stop` is set; closes in `finally`."""
        stop = stop or threading.Event()
        self.classifier.warm_up((1, self.settings.batch_max_size))
        self.capacity.rate = self._first_estimate()
        self.consumer.subscribe([self.images_topic])
        self.report_capacity(force=True)  # the admission controller may start admitting
        log.info(
            "inference consumer %s: model %s on %s, group %s",
            self.consumer_id,
            self.classifier.manifest.name,
            self.classifier.providers[0],
            self.group_id,
        )
        try:
            while not stop.is_set():
                messages = self.next_batch(idle_timeout_s=idle_timeout_s)
                if messages:
                    done = self.process(messages)
                    if on_batch is not None:
                        on_batch(done)
                self.report_capacity()
        finally:
            try:
                self.report_capacity(force=True)
                self.producer.close(10)
            finally:
                self.consumer.close()
                self.pool.shutdown(wait=True)
        return self.stats
