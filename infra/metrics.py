"""Every Prometheus metric of tagstream, registered here and nowhere else; and the small
HTTP server that exposes them.

The metrics are prometheus_client objects, created when this module is first imported;
each process imports the ones it updates, and puts the groups it owns into the client's
default registry with `expose` (which also carries the client's own ``process_*`` and
``python_*`` collectors). Names follow Prometheus's
conventions: ``tagstream_<area>_<thing>_<unit>``, ``_total`` for counters, base units
(seconds, bytes), and labels of bounded cardinality only (a reason, a stage, a cause, a
source, a partition; never a tweet id or a URL). A new metric is added to this module,
to its process's group (`ALL` is built from them), to the Grafana dashboard if it is
worth a panel (deploy/grafana/), and to the table in docs/architecture.md.

Where each process serves them:

- processes without a web server of their own (the inference consumer, the sources)
  call `serve_metrics`: ``/metrics`` and ``/healthz`` on ``metrics_host:metrics_port``
  (port 0: a free one, logged);
- the sink serves ``/metrics`` beside its gallery, and the Faust worker on its web
  server (``faust_web_port``): both through `exposition()`.
"""

from __future__ import annotations

import logging
import math
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    Counter,
    Enum,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import choose_encoder

from infra.exceptions import ConfigurationError
from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ALL", "MetricsServer", "exposition", "serve_metrics"]

#: Latencies from a tweet's ingestion to its result: tens of ms to minutes.
END_TO_END_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120)
#: One hop of a photo's way, or one stage of one batch: sub-millisecond to seconds.
STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip
#: Image fetches, retries included.
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Images per batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# Shared by every process ---------------------------------------------------------------

RECORDS_PRODUCED = Counter(
    "tagstream_records_produced_total",
    "Records the broker acknowledged, by topic (short name), through the RecordProducer",
    ["topic"],
    registry=None,
)
PRODUCE_FAILURES = Counter(
    "tagstream_produce_failures_total",
    "Records the broker did not take, by topic (short name)",
    ["topic"],
    registry=None,
)
DEAD_LETTERS = Counter(
    "tagstream_dead_letters_total",
    "Dead letters produced, by the stage that failed and the error's class",
    ["stage", "cause"],
    registry=None,
)
CONSUMER_LAG = Gauge(
    "tagstream_consumer_lag_messages",
    "Records on an assigned partition not yet read by this consumer (from the last "
    "fetch's high watermark)",
    ["group", "topic", "partition"],
    registry=None,
)
END_TO_END = Histogram(
    "tagstream_end_to_end_seconds",
    "From a tweet's ingestion (handed to the producer at the source) to its result's "
    "production, per result, by the tweet's source",
    ["source"],
    buckets=END_TO_END_BUCKETS,
    registry=None,
)
RESULT_STAGE = Histogram(
    "tagstream_result_stage_seconds",
    "Where a result's time went: each hop between two of its timestamps",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=None,
)

# Sources (producers/) -------------------------------------------------------------------

SOURCE_READ = Counter(
    "tagstream_source_items_read_total",
    "Items a source read: posts, rejected input and skips",
    ["source"],
    registry=None,
)
SOURCE_PRODUCED = Counter(
    "tagstream_source_tweets_produced_total",
    "Tweet records produced to `tweets`, by source and operation (create, update, delete)",
    ["source", "operation"],
    registry=None,
)
SOURCE_SKIPPED = Counter(
    "tagstream_source_skipped_total",
    "What a source read and left out on purpose, by reason",
    ["source", "reason"],
    registry=None,
)
SOURCE_DUPLICATES = Counter(
    "tagstream_source_duplicates_total",
    "Repeats of recent posts dropped (a stream replaying after a reconnect)",
    ["source"],
    registry=None,
)
SOURCE_RECONNECTS = Counter(
    "tagstream_source_reconnects_total",
    "Reconnects of a network source's stream",
    ["source"],
    registry=None,
)
SOURCE_BACKOFF = Counter(
    "tagstream_source_backoff_seconds_total",
    "Seconds a network source waited before reconnecting",
    ["source"],
    registry=None,
)
RULE_SYNC_CALLS = Counter(
    "tagstream_source_rule_sync_calls_total",
    "Calls to the X API's filtered-stream rules endpoint, by method and outcome",
    ["method", "outcome"],
    registry=None,
)

# The Faust agent (processors/shed_and_fetch.py, admission.py, result_cache.py) -----------

AGENT_CONSUMED = Counter(
    "tagstream_agent_tweets_consumed_total",
    "Records the Faust agent consumed from `tweets`",
    registry=None,
)
AGENT_ADMITTED = Counter(
    "tagstream_agent_tweets_admitted_total",
    "Tweets with photos that went on to the cache and the fetch",
    registry=None,
)
AGENT_SHED = Counter(
    "tagstream_agent_tweets_shed_total",
    "Tweets shed on record, by reason",
    ["reason"],
    registry=None,
)
AGENT_RETRACTIONS = Counter(
    "tagstream_agent_retractions_total",
    "Retractions produced for deleted and edited posts",
    registry=None,
)
AGENT_IMAGES = Counter(
    "tagstream_agent_images_total",
    "Image events produced to `images` (photos fetched)",
    registry=None,
)
AGENT_CACHED = Counter(
    "tagstream_agent_cached_results_total", "Results answered by the result cache", registry=None
)
AGENT_IN_FLIGHT = Gauge(
    "tagstream_agent_tweets_in_flight",
    "Tweets the agent is working on (fetching, delivering)",
    registry=None,
)
RESULT_CACHE_LOOKUPS = Counter(
    "tagstream_agent_result_cache_lookups_total",
    "Photo outcomes of the result cache, by outcome (hit, miss)",
    ["outcome"],
    registry=None,
)
ADMISSION_MODE = Enum(
    "tagstream_admission_mode",
    "The admission controller's mode",
    states=["closed_loop", "fallback", "fixed"],
    registry=None,
)
ADMISSION_RATE = Gauge(
    "tagstream_admission_rate_images_per_second", "Images/s this worker admits now", registry=None
)
ADMISSION_CAPACITY = Gauge(
    "tagstream_admission_capacity_images_per_second",
    "Capacity the live inference consumers report, in all",
    registry=None,
)
ADMISSION_BACKLOG = Gauge(
    "tagstream_admission_backlog_images",
    "Images admitted and not yet done (the estimate)",
    registry=None,
)
ADMISSION_DELAY = Gauge(
    "tagstream_admission_delay_seconds",
    "Queueing delay a photo admitted now would meet",
    registry=None,
)
ADMISSION_SHARE = Gauge(
    "tagstream_admission_share_ratio",
    "This worker's share of the tweets' partitions",
    registry=None,
)
ADMISSION_CONSUMERS = Gauge(
    "tagstream_admission_consumers", "Inference consumers reporting capacity", registry=None
)
FETCHING = Gauge(
    "tagstream_agent_photos_fetching", "Photos admitted and still being fetched", registry=None
)

# The safe fetcher (infra/fetcher.py) ------------------------------------------------------

FETCH_SECONDS = Histogram(
    "tagstream_fetch_seconds",
    "Successful image fetches, retries included",
    buckets=FETCH_BUCKETS,
    registry=None,
)
FETCH_FAILURES = Counter(
    "tagstream_fetch_failures_total",
    "Image fetches given up on, by cause",
    ["cause"],
    registry=None,
)
FETCH_RETRIES = Counter(
    "tagstream_fetch_retries_total",
    "Retries of transient fetch failures, by cause",
    ["cause"],
    registry=None,
)
FETCH_BYTES = Counter("tagstream_fetch_bytes_total", "Bytes of the images fetched", registry=None)

# The inference consumer (processors/inference.py) -----------------------------------------

INFERENCE_IMAGES = Counter(
    "tagstream_inference_images_total", "Results produced by the inference consumer", registry=None
)
INFERENCE_BATCHES = Counter(
    "tagstream_inference_batches_total",
    "Batches run, by why they closed (full, waited, idle, ...)",
    ["closed"],
    registry=None,
)
INFERENCE_BATCH_SIZE = Histogram(
    "tagstream_inference_batch_size_images",
    "Images per batch",
    buckets=BATCH_BUCKETS,
    registry=None,
)
INFERENCE_BATCH_SECONDS = Histogram(
    "tagstream_inference_batch_seconds",
    "Time of one batch in each stage: decode (summed over its images), decode_wait (the "
    "model waiting for it), model, deliver",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=None,
)
INFERENCE_CAPACITY = Gauge(
    "tagstream_inference_capacity_images_per_second",
    "Images per busy second of the model stage (what the consumer reports on `capacity`)",
    registry=None,
)
#: An info metric in the usual form (value 1, the facts as labels), a labelled gauge rather
#: than prometheus_client's Info: an Info that was never set still exposes a label-less 1,
#: which every process that serves no model would then show.
MODEL = Gauge(
    "tagstream_inference_model_info",
    "The model this consumer serves and where it runs (always 1)",
    ["model_id", "model_version", "provider", "precision", "decode_device", "consumer_id"],
    registry=None,
)

# The sink and gallery (processors/sink.py) ------------------------------------------------

SINK_SEEN = Counter(
    "tagstream_sink_results_seen_total", "Results the sink was offered", registry=None
)
SINK_SAMPLED = Counter(
    "tagstream_sink_results_sampled_total",
    "Results sampled into the gallery and samples file",
    registry=None,
)
SINK_WITHDRAWN = Counter(
    "tagstream_sink_results_withdrawn_total",
    "Results and samples dropped for a retraction",
    registry=None,
)
GALLERY_CLIENTS = Gauge(
    "tagstream_sink_gallery_clients",
    "Gallery pages that polled in the last few seconds",
    registry=None,
)

# The metrics by the process that owns them. A process exposes only its own (`expose`),
# so that the inference consumer, say, does not serve the agent's gauges at 0 (or the
# admission controller's mode at its first state); the shared ones, labelled and so
# absent until used, are exposed everywhere.
SHARED = (
    RECORDS_PRODUCED, PRODUCE_FAILURES, DEAD_LETTERS, CONSUMER_LAG, END_TO_END, RESULT_STAGE,
)  # fmt: skip
SOURCE = (
    SOURCE_READ, SOURCE_PRODUCED, SOURCE_SKIPPED, SOURCE_DUPLICATES, SOURCE_RECONNECTS,
    SOURCE_BACKOFF, RULE_SYNC_CALLS,
)  # fmt: skip
AGENT = (
    AGENT_CONSUMED, AGENT_ADMITTED, AGENT_SHED, AGENT_RETRACTIONS, AGENT_IMAGES, AGENT_CACHED,
    AGENT_IN_FLIGHT, RESULT_CACHE_LOOKUPS, ADMISSION_MODE, ADMISSION_RATE, ADMISSION_CAPACITY,
    ADMISSION_BACKLOG, ADMISSION_DELAY, ADMISSION_SHARE, ADMISSION_CONSUMERS, FETCHING,
)  # fmt: skip
FETCH = (FETCH_SECONDS, FETCH_FAILURES, FETCH_RETRIES, FETCH_BYTES)
INFERENCE = (
    INFERENCE_IMAGES, INFERENCE_BATCHES, INFERENCE_BATCH_SIZE, INFERENCE_BATCH_SECONDS,
    INFERENCE_CAPACITY, MODEL,
)  # fmt: skip
SINK = (SINK_SEEN, SINK_SAMPLED, SINK_WITHDRAWN, GALLERY_CLIENTS)
#: Every metric above (the dashboard test checks panels against these).
ALL = SHARED + SOURCE + AGENT + FETCH + INFERENCE + SINK

_exposed: set[int] = set()
_expose_lock = threading.Lock()


def expose(*groups: tuple[Any, ...]) -> None:
    """Serve these groups of metrics from this process (idempotent): each process says
    which it owns when it starts (the Faust agent AGENT and FETCH, the inference consumer
    INFERENCE, the sink SINK, a source SOURCE). They are updated either way."""
    with _expose_lock:
        for group in groups:
            for metric in group:
                if id(metric) not in _exposed:
                    REGISTRY.register(metric)
                    _exposed.add(id(metric))


expose(SHARED)

#: The hops of a result's way, between the timestamps its stages stamp (schemas/records.py).
RESULT_HOPS = (
    ("tweets_queue", "ingested", "received"),  # `tweets` topic, to the Faust agent
    ("admission", "received", "admitted"),
    ("fetch", "fetch_start", "fetched"),
    ("images_queue", "fetched", "consumed"),  # `images` topic, to an inference consumer
    ("decode", "consumed", "decoded"),
    ("model", "decoded", "inferred"),
    ("deliver", "inferred", "produced"),
)


def exposed_names() -> dict[str, str]:
    """Every sample name our metrics expose, with the metric's type: a counter's
    ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "stateset": ("",),
    }
    names: dict[str, str] = {}
    for metric in ALL:
        for family in metric.describe():
            for suffix in suffixes[family.type]:
                names[family.name + suffix] = family.type
    return names


# Updates shared by several processes ------------------------------------------------------


def observe_result(result: Mapping[str, Any]) -> None:
    """A result was produced: its end-to-end latency and the time of each hop."""
    stamps = result.get("timestamps") or {}
    ingested, produced = stamps.get("ingested"), stamps.get("produced")
    if _finite(ingested) and _finite(produced):
        source = result.get("source") or "unknown"
        END_TO_END.labels(source=source).observe(max(0.0, (produced - ingested) / 1000.0))
    for stage, start, end in RESULT_HOPS:
        began, ended = stamps.get(start), stamps.get(end)
        if _finite(began) and _finite(ended):
            RESULT_STAGE.labels(stage=stage).observe(max(0.0, (ended - began) / 1000.0))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


_lag_lock = threading.Lock()
_lag_partitions: dict[str, set[tuple[str, str]]] = {}


def set_consumer_lag(group: str, lags: Mapping[tuple[str, int], int]) -> None:
    """The lag of every partition `group` has assigned here now; partitions no longer
    assigned (a rebalance moved them) leave the metric."""
    current = {(topic, str(partition)) for topic, partition in lags}
    with _lag_lock:
        for topic, partition in _lag_partitions.get(group, set()) - current:
            try:
                CONSUMER_LAG.remove(group, topic, partition)
            except KeyError:  # already gone
                pass
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(group=group, topic=topic, partition=str(partition)).set(lag)
        _lag_partitions[group] = current


def exposition(accept: str = "") -> tuple[bytes, str]:
    """The registry in the format a scraper's Accept header asks for (OpenMetrics for
    Prometheus, the classic text format otherwise), and its Content-Type: for the
    aiohttp-based servers, as prometheus_client's own server does it."""
    encode, content_type = choose_encoder(accept)
    return encode(REGISTRY), content_type


# The /metrics and /healthz server ---------------------------------------------------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a scrape every second would flood the log


class _AfterResponse:
    """A WSGI body that calls `done` once the server has written it (WSGI calls close())."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
        self._done()


class MetricsServer:
    """``/metrics`` (the registry) and ``/healthz`` over HTTP, on a thread of its own.

    `health` says whether the process is well (``/healthz`` answers 503 otherwise).
    `wait_for_scrape` lets a process that ends on its own hand its last figures over.
    """

    def __init__(self, host: str, port: int, *, health: Callable[[], bool] | None = None) -> None:
        self._metrics_app = make_wsgi_app(REGISTRY)
        self._health = health
        self._scraped = threading.Condition()
        self._last_scrape_began: float | None = None  # of the last scrape answered in full
        try:
            self._server = make_server(
                host, port, self._app, _ThreadingWSGIServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}): set "
                "TAGSTREAM_METRICS_PORT to a free port, or 0 for any"
            ) from None
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            well = self._health() if self._health is not None else True
            status = "200 OK" if well else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n" if well else b"unhealthy\n"]
        if path == "/metrics":
            began = time.monotonic()
            return _AfterResponse(
                self._metrics_app(environ, start_response), lambda: self._answered(began)
            )
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    def _answered(self, began: float) -> None:
        with self._scraped:
            if self._last_scrape_began is None or began > self._last_scrape_began:
                self._last_scrape_began = began
            self._scraped.notify_all()

    def wait_for_scrape(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) for a scrape that begins now or later to be answered,
        so that the figures of now reach Prometheus before the process ends. Returns at
        once (False) when nothing ever scraped this server."""
        mark = time.monotonic()
        deadline = mark + timeout_s
        with self._scraped:
            if self._last_scrape_began is None:
                return False
            while self._last_scrape_began < mark:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._scraped.wait(left)
            return True


def serve_metrics(settings: Settings, *, health: Callable[[], bool] | None = None) -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on the settings' metrics host and port (port 0:
    a free one); says where in the log."""
    server = MetricsServer(settings.metrics_host, settings.metrics_port, health=health).start()
    log.info("metrics: %s (health: /healthz)", server.url)
    return server
