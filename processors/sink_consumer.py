"""The sampled sink's Kafka side: `hashtags` in; samples and the live gallery out.

Delivery guarantee: at-most-once on purpose. The sink shows a sample of the
results and writes it to a folder; a result lost in a crash is a sample not
taken, and offsets are committed automatically. Undecodable records go to
`deadletter`, as everywhere else. Its lag (every second) goes to the metrics and to
the gallery's status strip; the gallery's server also serves ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from confluent_kafka import Consumer

from infra import metrics
from infra.exceptions import CodecError
from infra.kafka import consumed, consumer_config, partition_lags
from infra.record_producer import RecordProducer, SourceRef
from infra.settings import Settings
from processors.sink import SampledSink, serve_gallery

log = logging.getLogger(__name__)


def consume_into(sink: SampledSink, settings: Settings, stop: threading.Event) -> None:

    producer = RecordProducer(settings)
    group = f"{settings.topic_prefix}tagstream-sink"
    consumer = Consumer(
        consumer_config(
            settings, group, **{"enable.auto.commit": True, "enable.auto.offset.store": True}
        )
    )
    consumer.subscribe([settings.topic("hashtags")])
    lag_at = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() - lag_at >= 1.0:
                lags = partition_lags(consumer)
                metrics.set_consumer_lag(group, lags)
                sink.view.set_lag(group, sum(lags.values()))
                lag_at = time.monotonic()
            for message in consumed(consumer, 100, 0.5):
                try:
                    sink.add(producer.codec.decode("HashtagResult", message.value()))
                except CodecError as exc:
                    producer.dead_letter(
                        SourceRef.of(message), "sink_decode", exc, payload=message.value()
                    )
            producer.poll(0)
            if sink.window_due():
                sink.flush()
    finally:
        sink.flush()
        producer.close(10)
        consumer.close()


async def run_sink(settings: Settings, *, ready: threading.Event | None = None) -> None:
    """Serve the gallery and consume results until cancelled."""
    sink = SampledSink(
        out_dir=settings.resolved_sink_dir,
        window_s=settings.sink_window_s,
        per_window=settings.sink_per_window,
    )
    runner, url = await serve_gallery(
        sink,
        host=settings.sink_host,
        port=settings.sink_port,
        prometheus_url=settings.prometheus_url,
    )
    print(f"gallery: {url}  (metrics: {url}metrics)", flush=True)
    stop = threading.Event()
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            consume_into(sink, settings, stop)
        except BaseException as exc:  # told below: a sink whose consumer died is not up
            failure.append(exc)

    thread = threading.Thread(target=consume, name="sink-consumer", daemon=True)
    thread.start()
    if ready is not None:
        ready.set()
    try:
        while thread.is_alive():
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        await runner.cleanup()
    if failure:
        raise failure[0]
