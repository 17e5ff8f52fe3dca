"""The embedded broker: start, our topics, produce/consume, clean stop."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient

from infra.broker import EmbeddedBroker
from infra.exceptions import BrokerError
from infra.settings import TOPIC_NAMES, Settings
from infra.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_embedded_broker_starts_creates_topics_and_stops(tmp_path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix="x-", topic_partitions=3)
        created = ensure_topics(settings)
        assert sorted(created) == sorted(f"x-{name}" for name in TOPIC_NAMES)
        assert ensure_topics(settings) == []  # idempotent
        topics = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=5).topics
        assert len(topics["x-tweets"].partitions) == 3
        assert len(topics["x-deadletter"].partitions) == 1
    finally:
        broker.stop()
    assert not broker.alive()


def test_port_in_use_is_a_clear_error(tmp_path) -> None:
    with EmbeddedBroker() as first:
        with pytest.raises(BrokerError, match="in use"):
            EmbeddedBroker(port=first.port).start(timeout_s=5)


def test_unset_bootstrap_is_a_clear_error() -> None:
    from infra.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="TAGSTREAM_KAFKA_BOOTSTRAP"):
        Settings(kafka_bootstrap=None).bootstrap()
