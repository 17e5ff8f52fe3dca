"""Waiting for the cluster and watching it: one line per outage, a bounded wait, and
commits that the group refuses let go of, not fatal."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from infra.exceptions import BrokerError
from infra.kafka import BrokerWatch, consumed, wait_for_broker
from infra.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    sleeps: list[float]


class Probe:
    """Answers, or times out, as the test says."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.up = True
        self.calls = 0

    def __call__(self, timeout_s: float) -> None:
        self.calls += 1
        if not self.up:
            self.clock.now += timeout_s
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Failed to get metadata"))


def watch_with(clock: Clock) -> tuple[BrokerWatch, Probe]:
    probe = Probe(clock)
    return BrokerWatch("k:9092", probe=probe, clock=clock), probe


def test_one_line_when_the_cluster_goes_and_one_when_it_answers(caplog) -> None:
    clock = Clock()
    watch, probe = watch_with(clock)
    caplog.set_level(logging.WARNING, "infra.kafka")
    assert watch.check() and not caplog.records
    probe.up = False
    for _ in range(5):  # a long stall: probed again and again
        assert not watch.check()
    # librdkafka clients say the same meanwhile: nothing more is written.
    watch.error_cb(KafkaError(KafkaError._TRANSPORT, "connection refused"))
    watch.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    probe.up = True
    assert watch.check() and watch.check()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and watch.outages == 1, lines
    assert "k:9092 is not answering" in lines[0] and "answers again after 12.0 s" in lines[1]


def test_other_client_errors_are_said_at_most_once_a_minute(caplog) -> None:
    clock = Clock()
    watch, _ = watch_with(clock)
    caplog.set_level(logging.WARNING, "infra.kafka")
    error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not allowed")
    for _ in range(3):
        watch.error_cb(error)
    clock.now += 61
    watch.error_cb(error)
    assert [r.getMessage() for r in caplog.records] == ["Kafka client: not allowed"] * 2
    assert watch.down_since is None


def test_wait_for_broker_waits_without_spinning_then_gives_up_clearly(caplog) -> None:
    clock = Clock()
    clock.sleeps = []
    watch, probe = watch_with(clock)
    probe.up = False
    settings = Settings(kafka_bootstrap="k:9092", broker_wait_s=20)
    import infra.kafka as kafka

    kafka._WATCHES["k:9092"] = watch
    caplog.set_level(logging.WARNING, "infra.kafka")
    try:
        with pytest.raises(BrokerError, match=r"k:9092 did not answer within 20 s"):
            wait_for_broker(settings, sleep=clock.sleep, clock=clock)
        assert probe.calls <= 8 and clock.sleeps == sorted(clock.sleeps)
        assert max(clock.sleeps) <= 5.0 and clock.now <= 20 + 3
        assert (
            sum("waiting for Kafka at k:9092 (up to 20 s" in r.getMessage() for r in caplog.records)
            == 1
        )

        # Later the broker answers during the wait: the process starts, saying so once.
        caplog.clear()
        clock.sleeps = []
        calls = probe.calls

        def comes_up(seconds: float) -> None:
            clock.sleep(seconds)
            probe.up = probe.calls - calls >= 3

        wait_for_broker(settings, sleep=comes_up, clock=clock)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2 and "answered after" in messages[1], messages
    finally:
        watch.stop()
        kafka._WATCHES.pop("k:9092", None)


class _Message:
    def __init__(self, error: KafkaError | None = None) -> None:
        self._error = error

    def error(self) -> KafkaError | None:
        return self._error


class _Consumer:
    def __init__(self, messages: list[_Message]) -> None:
        self.messages = messages

    def consume(self, max_messages: int, timeout: float) -> list[_Message]:
        return self.messages


def test_a_topic_not_created_yet_is_waited_for_an_unauthorized_one_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A consumer that subscribed before another process created its topics (the sink
    started with the broker) is told "Subscribed topic not available": librdkafka assigns
    the topic once it exists, so it is a warning, not the end of the process."""
    not_yet = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "Subscribed topic not available")
    record = _Message()
    with caplog.at_level(logging.WARNING, logger="infra.kafka"):
        assert consumed(_Consumer([_Message(not_yet), record]), 10, 0.1) == [record]
    assert "Subscribed topic not available" in caplog.text
    refused = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized")
    with pytest.raises(KafkaException):
        consumed(_Consumer([_Message(refused)]), 10, 0.1)
