"""The Faust app of tagstream: `faust -A processors worker` runs it.

Its one agent, `shed_and_fetch` (processors/shed_and_fetch.py), reads `tweets`.
Configuration comes from the settings object, like every other process. Its web server
(`faust_web_port`, on `metrics_host`) serves ``/metrics`` and ``/healthz``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import faust

from infra.exceptions import BrokerError
from infra.kafka import wait_for_broker
from infra.settings import Settings, get_settings
from infra.topics import ensure_topics
from processors.shed_and_fetch import register_agent


def use_fetch_wait(wait_ms: int) -> None:
    """Make Faust's Kafka consumer wait at most `wait_ms` for data in a fetch.

    faust-streaming builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` hard-coded.
    Real Kafka answers a fetch as soon as data is there, but tansu (the embedded broker)
    holds every fetch for the whole wait (measured), which put up to 1.5 s on every tweet
    between a producer and the agent. The settings' `fetch_wait_max_ms` is used instead,
    as the librdkafka clients use it (infra/kafka.py).
    """
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    original = getattr(thread, "_tagstream_original_create", thread._create_worker_consumer)

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = wait_ms  # read when the consumer starts its fetcher
        return consumer

    thread._tagstream_original_create = original
    thread._create_worker_consumer = create_worker_consumer


def faust_broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip()]


def create_app(settings: Settings) -> faust.App:
    use_fetch_wait(settings.fetch_wait_max_ms)
    (settings.data_dir / "faust").parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}tagstream",
        broker=faust_broker_urls(settings.bootstrap()),
        autodiscover=False,
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        topic_allow_declare=False,  # ours are created by infra.topics with their specs
        broker_session_timeout=settings.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_ms / 6000.0),
        broker_commit_interval=1.0,
        producer_acks=-1,
        producer_max_request_size=16_000_000,
        consumer_auto_offset_reset="earliest",
        web_host=settings.sink_host,
        web_port=settings.faust_web_port,
        web_bind=settings.metrics_host,  # /metrics and /healthz are served there too
        value_serializer="raw",
        key_serializer="raw",
    )

    @app.on_worker_init.connect
    def _wait_for_kafka_and_create_topics(sender: object, **_: object) -> None:
        # Before Faust's own clients start: wait for the cluster (one line while it is
        # away), or stop with one clear error line instead of a traceback.
        try:
            wait_for_broker(settings)
            ensure_topics(settings)
        except BrokerError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            os._exit(1)

    return app


settings = get_settings()
app = create_app(settings)
register_agent(app, settings)
