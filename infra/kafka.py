"""Kafka client configuration, in one place, and the one loop over consumed messages.

Settings become librdkafka dicts here (as quix-streams does); the Faust worker
gets the same bootstrap and timeouts through processors/app.py. Records are produced
through infra/record_producer.py.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from infra.settings import Settings

log = logging.getLogger(__name__)


def client_config(settings: Settings) -> dict[str, Any]:
    """Settings shared by every librdkafka client."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap(),
        "client.id": f"tagstream-{socket.gethostname()}",
        "socket.connection.setup.timeout.ms": 5000,
    }
    config.update(settings.kafka_extra)
    return config


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """An idempotent producer: retries never duplicate or reorder within a partition."""
    config = client_config(settings) | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.max.bytes": 16_000_000,
    }
    config.update(overrides)
    return config


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A consumer that commits by hand, after its work is delivered (at-least-once)."""
    config = client_config(settings) | {
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.session_timeout_ms // 6),
        "fetch.message.max.bytes": 16_000_000,
        # Measured: with librdkafka's 500 ms default, tansu answered each fetch only after
        # the full wait, and the inference consumer idled ~110 ms per batch.
        "fetch.wait.max.ms": settings.fetch_wait_max_ms,
    }
    config.update(overrides)
    return config


def consumed(
    consumer: Any,
    max_messages: int,
    timeout_s: float,
    *,
    on_eof: Callable[[Any], None] | None = None,
) -> list[Any]:
    """The next messages of a confluent-kafka consumer, without the error events.

    The one loop over consumed messages:
    - a partition EOF goes to `on_eof` (or is dropped), called before the messages are
      returned, so a caller must treat the EOF's offset, not the order of calls, as
      where the partition ends;
    - an error librdkafka recovers from by itself (a broker away, a transport error) is
      logged and skipped;
    - a fatal error raises KafkaException.
    """
    good = []
    for message in consumer.consume(max_messages, timeout=timeout_s):
        error = message.error()
        if error is None:
            good.append(message)
        elif error.code() == KafkaError._PARTITION_EOF:
            if on_eof is not None:
                on_eof(message)
        elif error.fatal() or not error.retriable() and error.code() not in _RECOVERABLE:
            raise KafkaException(error)
        else:
            log.warning("consumer: %s (librdkafka retries by itself)", error)
    return good


#: Errors a consumer reports and then recovers from by itself.
_RECOVERABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._MAX_POLL_EXCEEDED,
    }
)
