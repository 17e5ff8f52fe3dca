"""Kafka client configuration, in one place; the one loop over consumed messages; and
how a process waits for the cluster and says when it stops answering.

Settings become librdkafka dicts here (as quix-streams does); the Faust worker
gets the same bootstrap and timeouts through processors/app.py. Records are produced
through infra/record_producer.py.

The cluster going away is an event, not a stream of errors: librdkafka retries by
itself and logs every failed connection attempt, many a second. Its log lines are kept
at debug level here, and `BrokerWatch` says in one line that the cluster stopped
answering (a failed connection, or a metadata request that gets no answer: a stalled
broker keeps its connections open and answers nothing) and in one line that it
answers again. `wait_for_broker` is how every process starts: it waits, with one line
saying so, until the cluster answers, or stops with a clear error after
``broker_wait_s``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from infra.exceptions import BrokerError
from infra.settings import Settings

log = logging.getLogger(__name__)

#: Bytes a record may have: a photo with its event (fetch_max_bytes stays below), and a
#: dead letter of one with its bytes. infra/topics.py gives the topics the same limit.
MAX_MESSAGE_BYTES = 16_000_000


class _LibrdkafkaLog:
    """librdkafka's own log lines, at debug level: a cluster that is away makes it log
    every reconnect attempt, and `BrokerWatch` says the same in one line."""

    def __init__(self) -> None:
        self._log = logging.getLogger("librdkafka")

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._log.debug(msg, *args)


_QUIET = _LibrdkafkaLog()


def client_config(settings: Settings) -> dict[str, Any]:
    """Settings shared by every librdkafka client."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap(),
        "client.id": f"tagstream-{socket.gethostname()}",
        "socket.connection.setup.timeout.ms": 5000,
        "logger": _QUIET,
        "error_cb": broker_watch(settings).error_cb,
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
        "message.max.bytes": MAX_MESSAGE_BYTES,
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
        "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
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


def partition_lags(consumer: Any) -> dict[tuple[str, int], int]:
    """Records behind the end of each partition assigned to a confluent-kafka consumer:
    the high watermark it last fetched less its position (the next record the application
    will be given). From cached watermarks: never a broker round trip, so a consuming
    thread may call it. A partition with nothing known yet is left out."""
    lags: dict[tuple[str, int], int] = {}
    try:
        for tp in consumer.assignment():
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            (position,) = consumer.position([tp])
            offset = position.offset if position.offset >= 0 else low
            if high >= 0 and offset >= 0:
                lags[(tp.topic, tp.partition)] = max(0, high - offset)
    except Exception as exc:  # lag is advisory; never stop a consumer over it
        log.debug("lag unavailable: %s", exc)
    return lags


#: Errors a consumer reports and then recovers from by itself. A subscribed topic that
#: does not exist yet is one: a process started with the broker may subscribe before the
#: topics are created (by `ensure_topics`, in another process), and librdkafka assigns it
#: once its metadata shows the topic.
_RECOVERABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._MAX_POLL_EXCEEDED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


# Waiting for the cluster, and watching it -------------------------------------------

#: librdkafka errors that mean the cluster is not reachable (it retries by itself).
_UNREACHABLE = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})


class BrokerWatch:
    """One line when the cluster stops answering, one when it answers again.

    Fed by the `error_cb` of every librdkafka client of the process and, once `start`
    is called, by a probe thread that asks for metadata every `interval_s` (a stalled
    broker refuses nothing and answers nothing, so only a probe notices it). Other
    client errors are logged at most once a minute each.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        probe: Callable[[float], None],
        interval_s: float = 2.0,
        timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap = bootstrap
        self._probe = probe
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.outages = 0
        self._said: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def of(cls, settings: Settings) -> BrokerWatch:
        admin: list[AdminClient] = []

        def probe(timeout_s: float) -> None:
            if not admin:  # one client for the life of the process, made on first use
                config = client_config(settings)
                config.pop("error_cb")  # the probe's own failures are told by its result
                admin.append(AdminClient(config))
            admin[0].list_topics(timeout=timeout_s)

        return cls(settings.bootstrap(), probe=probe)

    # What the clients and the probe report ---------------------------------------

    def unreachable(self, reason: str) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = self._clock()
            self.outages += 1
        log.warning(
            "Kafka at %s is not answering (%s); waiting for it: work resumes by itself "
            "when it answers",
            self.bootstrap,
            reason,
        )

    def answered(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            away = self._clock() - self.down_since
            self.down_since = None
        log.warning("Kafka at %s answers again after %.1f s", self.bootstrap, away)

    def error_cb(self, error: KafkaError) -> None:
        if error.code() in _UNREACHABLE:
            self.unreachable(error.str())
            return
        key = f"{error.code()}"
        now = self._clock()
        with self._lock:
            if now - self._said.get(key, -1e9) < 60.0:
                return
            self._said[key] = now
        log.warning("Kafka client: %s", error.str())

    # The probe ---------------------------------------------------------------------

    def check(self) -> bool:
        """Ask the cluster for metadata once; True when it answered."""
        try:
            self._probe(self.timeout_s)
        except Exception as exc:  # KafkaException: no answer within the timeout
            self.unreachable(f"no metadata within {self.timeout_s:g} s: {_reason(exc)}")
            return False
        self.answered()
        return True

    def start(self) -> BrokerWatch:
        """Probe every `interval_s` in a daemon thread, for the life of the process."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)
                self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()


def _reason(exc: BaseException) -> str:
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return error.str() if error is not None else str(exc)


_WATCHES: dict[str, BrokerWatch] = {}
_WATCHES_LOCK = threading.Lock()


def broker_watch(settings: Settings) -> BrokerWatch:
    """The process's watch of the cluster at `settings.bootstrap()` (one per cluster)."""
    bootstrap = settings.bootstrap()
    with _WATCHES_LOCK:
        watch = _WATCHES.get(bootstrap)
        if watch is None:
            watch = _WATCHES[bootstrap] = BrokerWatch.of(settings)
        return watch


def wait_for_broker(
    settings: Settings,
    *,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once the cluster answers; raise BrokerError after ``broker_wait_s``.

    Says once that it is waiting (and how long it will), and once that the cluster
    answered. Between two tries it sleeps, longer each time up to 5 s: no busy loop.
    Then the process's `BrokerWatch` starts watching.
    """
    watch = broker_watch(settings)
    started = clock()
    deadline = started + settings.broker_wait_s
    pause = 0.5
    said = False
    while True:
        try:
            watch._probe(min(watch.timeout_s, max(0.5, deadline - clock())))
        except Exception as exc:
            if not said:
                log.warning(
                    "waiting for Kafka at %s (up to %g s, TAGSTREAM_BROKER_WAIT_S): %s",
                    watch.bootstrap, settings.broker_wait_s, _reason(exc),
                )  # fmt: skip
                said = True
            if clock() + pause > deadline:
                raise BrokerError(
                    f"Kafka at {watch.bootstrap} did not answer within "
                    f"{settings.broker_wait_s:g} s; is it running? (TAGSTREAM_KAFKA_BOOTSTRAP "
                    "says where, TAGSTREAM_BROKER_WAIT_S how long to wait)"
                ) from None
            sleep(pause)
            pause = min(pause * 2, 5.0)
            continue
        if said:
            log.warning("Kafka at %s answered after %.1f s", watch.bootstrap, clock() - started)
        watch.start()
        return
