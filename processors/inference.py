"""The inference consumer: `images` in; `hashtags`, `deadletter` and `capacity` out.

A plain confluent-kafka consumer in the group `<prefix>tagstream-inference`, one process
per GPU (or CPU box, or several per GPU), built as a pipeline of three stages, so that
while the model runs batch n, batch n+1 is consumed and decoded and batch n-1's results
are being delivered:

1. consume + decode (the thread calling `run`): assembles batches adaptively
   (processors/batching.py: full under a backlog, never waiting while the model is idle,
   at most `batch_max_wait_ms` while it is busy) and starts decoding each image as it
   arrives (processors/decoding.py: Pillow with `draft()` on a thread pool, or nvJPEG on
   the GPU a batch at a time), straight into the batch's preallocated input buffer;
2. model (a thread): waits for the batch's decodes, runs ONNX Runtime on the buffer in
   place with I/O binding (models/runtime.py), and frees the buffer;
3. delivery (a thread): maps scores to hashtags with the manifest and produces the
   results and dead letters through the RecordProducer, whose own thread serves the
   delivery reports; no flush per batch.

In-flight work is bounded: `pipeline_depth` batch buffers exist, and a batch takes one
before it is consumed and gives it back after the model ran; records produced but not yet
acknowledged are bounded too (consuming pauses past `4 * depth * batch_max_size`). So
memory stays flat however large the backlog (librdkafka's prefetch is bounded by its
`queued.max.messages.kbytes`).

Delivery guarantee: at-least-once. Each consumed record produces exactly one record (its
result or its dead letter). A partition's offset is stored for commit only up to the
record whose output, and every earlier record's output on that partition, the broker has
acknowledged (processors/offsets.py); librdkafka commits stored offsets every
`commit_interval_ms`, on a rebalance and on close. A kill at any moment therefore loses
nothing: what was not committed is consumed again after a restart, and results are keyed
by tweet id and carry the media key, so a duplicate is harmless. A failed delivery or a
failing stage stops the consumer with an error; nothing past the failed record is
committed.

Metrics (infra/metrics.py): results, batches by why they closed, batch sizes, each
batch's decode, decode-wait, model and delivery seconds, the capacity it reports, its lag
per partition (every second, with the capacity report), the end-to-end latency and the
time of every hop of each result, and the model it serves as an info metric.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import Consumer, KafkaException, TopicPartition

from infra import metrics
from infra.exceptions import CodecError, ModelError, TagstreamError
from infra.kafka import consumed, consumer_config, partition_lags
from infra.record_producer import RecordProducer, SourceRef
from infra.settings import Settings
from models.runtime import OnnxClassifier
from processors.batching import BatchPolicy, assemble
from processors.decoding import Batch, Decoder, DeviceDecoder, HostDecoder, Prepared
from processors.offsets import DeliveredOffsets
from schemas.records import HashtagResult, capacity_report, hashtag_result, now_ms

log = logging.getLogger(__name__)

#: Seconds between two capacity reports: the admission controller's sampling period.
REPORT_INTERVAL_S = 1.0


class CapacityMeter:
    """Images per busy second of the model stage: what this consumer can take.

    The model stage is where the pipeline's bottleneck shows: its busy time is the model
    plus any wait for a batch's decodes (decoding is the bottleneck when that wait is
    long), and excludes waiting for images to arrive (an idle consumer has not lost
    capacity). An exponentially weighted mean over busy time, with a time constant of
    `tau_s` busy seconds."""

    def __init__(self, *, initial: float = 0.0, tau_s: float = 2.0) -> None:
        self._lock = threading.Lock()
        self.rate = initial
        self.tau_s = tau_s

    def add(self, images: int, busy_s: float) -> None:
        if images <= 0 or busy_s <= 0:
            return
        weight = 1.0 - math.exp(-busy_s / self.tau_s)
        measured = images / busy_s
        with self._lock:
            self.rate = measured if self.rate <= 0 else self.rate + weight * (measured - self.rate)


@dataclass
class InferenceStats:
    """What one consumer did: its log line, its capacity reports and its metrics."""

    provider: str = ""  # ONNX Runtime's provider really used: cpu, cuda, tensorrt
    precision: str = ""  # fp32, fp16, int8
    decode_device: str = ""  # cpu (Pillow) or cuda (nvJPEG)
    images: int = 0  # results produced
    dead_letters: int = 0
    batches: int = 0
    closed: Counter = field(default_factory=Counter)  # batches by why they closed
    decode_s: float = 0.0  # decode time, summed per image (host) or per batch (device)
    decode_wait_s: float = 0.0  # the model stage waiting for a batch's decodes to finish
    model_idle_s: float = 0.0  # the model stage waiting for a batch to be consumed
    infer_s: float = 0.0  # ONNX Runtime
    deliver_s: float = 0.0  # building results and handing them to the producer
    first_batch_at: float = 0.0  # time.monotonic() when the first batch reached the model
    last_batch_at: float = 0.0  # ... and when the last one's records were produced

    @property
    def images_per_s(self) -> float:
        """Results per second between the first batch and the last."""
        elapsed = self.last_batch_at - self.first_batch_at
        return self.images / elapsed if elapsed > 0 else 0.0

    @property
    def mean_batch(self) -> float:
        return (self.images + self.dead_letters) / self.batches if self.batches else 0.0


def make_decoder(settings: Settings, classifier: OnnxClassifier, codec) -> Decoder:
    """The decoder `settings.decode_device` asks for: the GPU's when the model runs there."""
    on_gpu = classifier.provider in ("cuda", "tensorrt")
    device = settings.decode_device
    if device == "cuda" and not on_gpu:
        raise ModelError(
            "decode_device=cuda needs the model on the GPU too (ort_provider cuda or "
            f"tensorrt), but it runs on {classifier.provider}"
        )
    if device == "cuda" or (device == "auto" and on_gpu):
        return DeviceDecoder(
            classifier,
            codec,
            thumbnail_px=settings.thumbnail_px,
            depth=settings.pipeline_depth,
        )
    return HostDecoder(
        classifier,
        codec,
        workers=settings.decode_workers,
        thumbnail_px=settings.thumbnail_px,
        depth=settings.pipeline_depth,
    )


class StageFailed(RuntimeError):
    """A pipeline stage's thread failed; the consumer stops with its error as the cause."""


class InferenceConsumer:
    """Consume ImageEvents, classify them in pipelined batches, produce HashtagResults."""

    def __init__(
        self,
        settings: Settings,
        classifier: OnnxClassifier,
        *,
        group_id: str | None = None,
        consumer_id: str | None = None,
        decoder: Callable[[Settings, OnnxClassifier, object], Decoder] = make_decoder,
    ) -> None:

        if classifier.max_batch < settings.batch_max_size:
            raise ModelError(
                f"the classifier's buffers hold {classifier.max_batch} images, fewer than "
                f"batch_max_size={settings.batch_max_size}"
            )
        self.settings = settings
        self.classifier = classifier
        metrics.expose(metrics.INFERENCE)
        self.consumer_id = (
            consumer_id or settings.consumer_id or f"{socket.gethostname()}-{os.getpid()}"
        )
        self.group_id = group_id or f"{settings.topic_prefix}tagstream-inference"
        self.images_topic = settings.topic("images")
        # Offsets are stored by hand once delivered (enable.auto.offset.store is off) and
        # committed by librdkafka: periodically, on a rebalance and on close.
        self.consumer = Consumer(
            consumer_config(
                settings,
                self.group_id,
                **{
                    "enable.auto.commit": True,
                    "auto.commit.interval.ms": settings.commit_interval_ms,
                },
            )
        )
        self.producer = RecordProducer(settings)
        self.codec = self.producer.codec
        self.decoder = decoder(settings, classifier, self.codec)
        self.policy = BatchPolicy(
            max_size=settings.batch_max_size, max_wait_s=settings.batch_max_wait_ms / 1000.0
        )
        self.offsets = DeliveredOffsets()
        self.max_undelivered = 4 * self.decoder.depth * settings.batch_max_size
        self.stats = InferenceStats(
            provider=classifier.provider,
            precision=classifier.precision,
            decode_device=self.decoder.device,
        )
        # One slot per batch buffer of the decoder: a batch takes one before it is
        # consumed and gives it back once the model ran, which bounds the batches in flight.
        self._free_slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.decoder.depth):
            self._free_slots.put(slot)
        self._to_model: queue.Queue[Batch | None] = queue.Queue()
        self._to_deliver: queue.Queue[tuple[Batch, np.ndarray | None, float] | None]
        self._to_deliver = queue.Queue(maxsize=self.decoder.depth)
        self._model_lock = threading.Lock()
        self._model_batches = 0  # batches handed to the model stage and not yet run
        self._failure: BaseException | None = None
        self.capacity = CapacityMeter()
        self._batch_size = float(settings.batch_max_size)
        self._report_lock = threading.Lock()
        self._last_report = time.monotonic()
        self._report_images = 0
        self._report_batches = 0
        self._on_batch: Callable[[int], None] | None = None

    # -- stage 1: consume and decode ----------------------------------------------------
    def model_idle(self) -> bool:
        """No batch queued for the model or running in it."""
        with self._model_lock:
            return self._model_batches == 0

    def _fetch_into(self, batch: Batch) -> Callable[[int, float], int]:
        def fetch(n: int, timeout_s: float) -> int:
            messages = consumed(self.consumer, n, timeout_s)
            for message in messages:
                batch.prepared.append(Prepared(message, timestamps={"consumed": now_ms()}))
                batch.pending.append(self.offsets.track_message(message))
                self.decoder.add(batch, len(batch.prepared) - 1)
            return len(messages)

        return fetch

    def _next_batch(self, idle_timeout_s: float) -> Batch | None:
        """Assemble one batch into a free buffer (waits for one: the in-flight bound)."""
        try:
            slot = self._free_slots.get(timeout=idle_timeout_s)
        except queue.Empty:
            return None
        batch = Batch(slot)
        size, batch.closed = assemble(
            self._fetch_into(batch),
            policy=self.policy,
            model_idle=self.model_idle,
            first_timeout_s=idle_timeout_s,
        )
        if not size:
            self._free_slots.put(slot)
            return None
        self.decoder.close(batch)
        return batch

    def _store_ready_offsets(self) -> None:
        ready = self.offsets.take_ready()
        if not ready:
            return
        try:
            self.consumer.store_offsets(
                offsets=[TopicPartition(t, p, o) for (t, p), o in ready.items()]
            )
        except KafkaException as exc:
            # A partition revoked since: its new owner consumes from the last commit.
            log.debug("offsets not stored (%s): %s", ready, exc)

    def _on_revoke(self, consumer, partitions) -> None:
        # librdkafka commits the stored offsets of revoked partitions: store what is
        # delivered now. Records still in flight are consumed again by the new owner.
        self._store_ready_offsets()

    def _failed(self, stage: str, exc: BaseException) -> None:
        """Keep a stage's failure for the consumer to stop on: one line for our own errors
        (a schema registry that does not answer), a traceback for anything else."""
        self._failure = self._failure or exc
        if isinstance(exc, TagstreamError):
            log.error("the %s stage stopped: %s", stage, exc)
        else:
            log.exception("the %s stage failed", stage)

    def _raise_if_failed(self) -> None:
        if isinstance(self._failure, TagstreamError):  # one we raise on purpose, with its words
            raise self._failure
        if self._failure is not None:
            raise StageFailed(f"a pipeline stage failed: {self._failure}") from self._failure
        failure = self.offsets.failure
        if failure is not None:
            raise failure

    # -- stage 2: the model -------------------------------------------------------------
    def _model_loop(self) -> None:
        try:
            runner = self.classifier.runner()
            while True:
                waited = time.perf_counter()
                batch = self._to_model.get()
                if batch is None:
                    return
                started = time.perf_counter()
                self.decoder.wait(batch)
                decoded = time.perf_counter()
                probabilities = None
                if any(p.error is None for p in batch.prepared):
                    probabilities = self.decoder.run_model(runner, batch)
                self._throttle(len(batch.prepared), started)
                inferred = time.perf_counter()
                self.capacity.add(len(batch.prepared), inferred - started)
                self._free_slots.put(batch.slot)
                stats = self.stats
                if not stats.first_batch_at:
                    stats.first_batch_at = time.monotonic()
                decode_s = batch.decode_s + sum(p.decode_s for p in batch.prepared)
                stats.model_idle_s += started - waited
                stats.decode_wait_s += decoded - started
                stats.infer_s += inferred - decoded
                stats.decode_s += decode_s
                seconds = metrics.INFERENCE_BATCH_SECONDS
                seconds.labels(stage="decode").observe(decode_s)
                seconds.labels(stage="decode_wait").observe(decoded - started)
                seconds.labels(stage="model").observe(inferred - decoded)
                self._to_deliver.put((batch, probabilities, now_ms()))
                with self._model_lock:
                    self._model_batches -= 1
        except BaseException as exc:
            self._failed("model", exc)
        finally:
            self._to_deliver.put(None)

    def _throttle(self, images: int, started: float) -> None:
        """A slower device, simulated (tests, demos): at most `infer_throttle_images_per_s`."""
        rate = self.settings.infer_throttle_images_per_s
        if rate:
            time.sleep(max(0.0, images / rate - (time.perf_counter() - started)))

    def _first_estimate(self) -> float:
        """Capacity before any image: one full batch through the model alone, less a
        share for decoding; the meter corrects it from the first real batches on."""
        size = self.settings.batch_max_size
        batch = self.classifier.input_buffer(size)
        started = time.perf_counter()
        self.classifier.probabilities(batch)
        estimate = 0.7 * size / max(time.perf_counter() - started, 1e-6)
        rate = self.settings.infer_throttle_images_per_s
        return min(estimate, rate) if rate else estimate

    # -- stage 3: delivery --------------------------------------------------------------
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
            provider=self.classifier.provider,
            precision=self.classifier.precision,
            thumbnail=prepared.thumbnail,
            timestamps=prepared.timestamps | {"inferred": inferred, "produced": now_ms()},
        )

    def _dead_letter(self, prepared: Prepared, on_delivery) -> None:
        message, event = prepared.message, prepared.event
        self.producer.dead_letter(
            SourceRef.of(message),
            prepared.stage,
            prepared.error or RuntimeError("unknown"),
            tweet_id=event["tweet_id"] if event else None,
            media_key=event["media_key"] if event else None,
            url=event["url"] if event else None,
            payload=message.value() if prepared.stage == "decode_image_event" else None,
            on_delivery=on_delivery,
        )
        self.stats.dead_letters += 1

    def _deliver(self, batch: Batch, probabilities: np.ndarray | None, inferred: float) -> int:
        done = 0
        for row, prepared in enumerate(batch.prepared):
            on_delivery = self.offsets.delivered_callback(batch.pending[row])
            if prepared.error is None:
                assert probabilities is not None and prepared.event is not None
                try:
                    result = self.result_for(prepared, probabilities[row], inferred)
                    self.producer.send(
                        "hashtags", result, key=prepared.event["tweet_id"], on_delivery=on_delivery
                    )
                    metrics.observe_result(result)
                    done += 1
                    continue
                except CodecError as exc:  # a result that does not fit its schema
                    prepared.error, prepared.stage = exc, "encode_result"
            self._dead_letter(prepared, on_delivery)
        return done

    def _deliver_loop(self) -> None:
        try:
            while True:
                item = self._to_deliver.get()
                if item is None:
                    return
                started = time.perf_counter()
                batch, probabilities, inferred = item
                done = self._deliver(batch, probabilities, inferred)
                stats = self.stats
                delivered_s = time.perf_counter() - started
                stats.images += done
                stats.batches += 1
                stats.closed[batch.closed] += 1
                stats.deliver_s += delivered_s
                metrics.INFERENCE_IMAGES.inc(done)
                metrics.INFERENCE_BATCHES.labels(closed=batch.closed).inc()
                metrics.INFERENCE_BATCH_SIZE.observe(len(batch.prepared))
                metrics.INFERENCE_BATCH_SECONDS.labels(stage="deliver").observe(delivered_s)
                stats.last_batch_at = time.monotonic()
                with self._report_lock:
                    self._report_images += done
                    self._report_batches += 1
                if self._on_batch is not None:
                    self._on_batch(done)
        except BaseException as exc:
            self._failed("delivery", exc)

    # -- capacity -----------------------------------------------------------------------
    def report_capacity(self, *, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._last_report
        if not force and elapsed < REPORT_INTERVAL_S:
            return
        with self._report_lock:
            images, batches = self._report_images, self._report_batches
            self._report_images = self._report_batches = 0
        if batches:
            # The mean batch of the window: a photo admitted now waits about one batch in
            # the model. Before any (and while idle), the last known, at first a full one.
            self._batch_size = images / batches
        lags = partition_lags(self.consumer)
        metrics.set_consumer_lag(self.group_id, lags)
        metrics.INFERENCE_CAPACITY.set(self.capacity.rate)
        report = capacity_report(
            consumer_id=self.consumer_id,
            images_per_s=self.capacity.rate,
            batch_size=self._batch_size,
            # Waiting on Kafka, and consumed but not yet through: a pipeline holds batches
            # that wait for the model as much as a topic does.
            queue_depth=sum(lags.values()) + self.offsets.in_flight,
        )
        self.producer.send("capacity", report, key=self.consumer_id)
        self._last_report = now

    def healthy(self) -> bool:
        """No stage has failed (the consumer is stopping if one has): ``/healthz``."""
        return self._failure is None and self.offsets.failure is None

    # -- running ------------------------------------------------------------------------
    def run(
        self,
        *,
        stop: threading.Event | None = None,
        idle_timeout_s: float = 0.5,
        on_batch: Callable[[int], None] | None = None,
    ) -> InferenceStats:
        """Warm up, join the group and process until `stop` is set; then finish the batches
        in flight, deliver their records, commit, and close (also on an error)."""
        stop = stop or threading.Event()
        self._on_batch = on_batch
        self.classifier.warm_up((1, self.settings.batch_max_size))
        self.capacity.rate = self._first_estimate()
        manifest = self.classifier.manifest
        metrics.MODEL.labels(
            model_id=manifest.model_id,
            model_version=manifest.version,
            provider=self.classifier.provider,
            precision=self.classifier.precision,
            decode_device=self.decoder.device,
            consumer_id=self.consumer_id,
        ).set(1)
        self.producer.start_polling()
        try:
            # Before joining the group: a first report that cannot go (a schema registry
            # away) stops the consumer before it holds any partition.
            self.report_capacity(force=True)  # the admission controller may start admitting
            self.consumer.subscribe([self.images_topic], on_revoke=self._on_revoke)
            log.info(
                "inference consumer %s: model %s on %s (%s), decode on %s, group %s",
                self.consumer_id,
                self.classifier.manifest.name,
                self.classifier.provider,
                self.classifier.precision,
                self.decoder.device,
                self.group_id,
            )
            stages = [
                threading.Thread(target=self._model_loop, name="model", daemon=True),
                threading.Thread(target=self._deliver_loop, name="deliver", daemon=True),
            ]
            for thread in stages:
                thread.start()
            while not stop.is_set():
                self._raise_if_failed()
                self._store_ready_offsets()
                self.report_capacity()
                if self.offsets.in_flight >= self.max_undelivered:
                    time.sleep(0.005)  # the broker is behind: let deliveries catch up
                    continue
                batch = self._next_batch(idle_timeout_s)
                if batch is not None:
                    with self._model_lock:
                        self._model_batches += 1
                    self._to_model.put(batch)
            self._to_model.put(None)  # the stages finish the batches in flight, then stop
            for thread in stages:
                thread.join()
            self._raise_if_failed()
        except BaseException:
            self._close(clean=False)
            raise
        self._close(clean=True)
        return self.stats

    def _close(self, *, clean: bool) -> None:
        """Deliver what was produced, store the offsets delivered, close (which commits)."""
        self._to_model.put(None)
        try:
            if clean:
                self.report_capacity(force=True)
            self.producer.close(30)  # waits for every delivery report
        except TagstreamError as exc:
            if clean:
                raise
            log.error("while stopping after an error: %s", exc)
        finally:
            self._store_ready_offsets()
            self.consumer.close()  # commits the stored offsets
            self.decoder.shutdown()
