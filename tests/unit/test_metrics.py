"""The metrics of infra/metrics.py: their names and labels, the HTTP server that exposes
them (over real HTTP), and the updates several processes share."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra import metrics
from infra.exceptions import ConfigurationError
from infra.settings import Settings
from tests.helpers import MetricDeltas

REPO = Path(__file__).resolve().parents[2]
#: Labels that would give a series per tweet, photo or URL.
UNBOUNDED = re.compile(r"(^|_)(id|ids|key|url|text|tweet|media)($|_)")
#: Labels that look like ids but take one value per process (its group, model, consumer).
ONE_PER_PROCESS = {
    ("tagstream_consumer_lag_messages", "group"),
    ("tagstream_inference_model_info", "model_id"),
    ("tagstream_inference_model_info", "consumer_id"),
}


def get(url: str, *, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def test_names_and_labels_follow_prometheus_conventions() -> None:
    seen: set[str] = set()
    for metric in metrics.ALL:
        (family,) = metric.describe()
        assert family.name.startswith("tagstream_"), family.name
        assert family.name not in seen, f"{family.name} registered twice"
        seen.add(family.name)
        assert family.documentation.strip(), f"{family.name} has no help text"
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_images")), family.name
        if family.type == "gauge":
            assert not family.name.endswith("_total"), family.name
        labels = metric._labelnames  # what it was declared with
        for label in labels:
            if (family.name, label) in ONE_PER_PROCESS:
                continue
            assert not UNBOUNDED.search(label), (family.name, label)
    exposed = metrics.exposed_names()
    counters = [name for name, kind in exposed.items() if kind == "counter"]
    assert counters and all(name.endswith("_total") for name in counters)
    assert "tagstream_end_to_end_seconds_bucket" in exposed
    assert "tagstream_inference_model_info" in exposed


def test_every_metric_is_in_the_architecture_table() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("## Metrics", 1)[1]
    for metric in metrics.ALL:
        (family,) = metric.describe()
        shown = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{shown}`" in table, f"{shown} is missing from docs/architecture.md"


def test_a_process_serves_only_the_metrics_it_owns() -> None:
    # A fresh interpreter: this one has exposed every group by now.
    script = (
        "from infra import metrics\n"
        "before = metrics.exposition()[0].decode()\n"
        "metrics.expose(metrics.AGENT, metrics.FETCH)\n"
        "metrics.expose(metrics.AGENT)\n"  # idempotent
        "after = metrics.exposition()[0].decode()\n"
        "print('agent before', 'tagstream_agent_' in before)\n"
        "print('mode before', 'tagstream_admission_mode' in before)\n"
        "print('agent after', 'tagstream_agent_tweets_consumed_total 0.0' in after)\n"
        "print('inference after', 'tagstream_inference_' in after)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == [
        "agent before False",
        "mode before False",
        "agent after True",
        "inference after False",
    ]


def test_the_server_serves_metrics_and_health_and_nothing_else() -> None:
    metrics.expose(metrics.SOURCE)
    well = threading.Event()
    well.set()
    server = metrics.MetricsServer("127.0.0.1", 0, health=well.is_set).start()
    try:
        base = server.url.removesuffix("/metrics")
        metrics.SOURCE_READ.labels(source="metrics-test").inc(3)
        status, content_type, body = get(server.url)
        assert status == 200 and content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        (sample,) = [
            s
            for s in families["tagstream_source_items_read"].samples
            if s.labels == {"source": "metrics-test"} and s.name.endswith("_total")
        ]
        assert sample.value >= 3
        assert "process_resident_memory_bytes" in families  # the client's own collectors
        # What Prometheus asks for, it gets: OpenMetrics.
        status, content_type, body = get(server.url, accept="application/openmetrics-text")
        assert content_type.startswith("application/openmetrics-text") and "# EOF" in body
        assert get(base + "/healthz")[:1] == (200,)
        well.clear()
        assert get(base + "/healthz")[0] == 503
        assert get(base + "/")[0] == 404
    finally:
        server.stop()


def test_a_process_that_ends_waits_for_one_more_scrape_only_if_it_is_scraped() -> None:
    server = metrics.MetricsServer("127.0.0.1", 0).start()
    try:
        started = time.monotonic()
        assert server.wait_for_scrape(5.0) is False  # nobody scrapes it: no wait
        assert time.monotonic() - started < 1.0
        get(server.url)
        assert server.wait_for_scrape(0.3) is False  # that scrape began before the wait
        later = threading.Timer(0.3, get, args=(server.url,))
        later.start()
        assert server.wait_for_scrape(5.0) is True
        later.join()
    finally:
        server.stop()


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(metrics_port=port)
        with pytest.raises(ConfigurationError, match="TAGSTREAM_METRICS_PORT"):
            metrics.serve_metrics(settings)


def test_a_result_gives_its_end_to_end_latency_and_the_time_of_each_hop() -> None:
    moved = MetricDeltas()
    stamps = {
        "ingested": 1000.0,
        "received": 1010.0,
        "admitted": 1011.0,
        "fetch_start": 1012.0,
        "fetched": 1062.0,
        "consumed": 1070.0,
        "decoded": 1075.0,
        "inferred": 1095.0,
        "produced": 1100.0,
    }
    metrics.observe_result({"source": "hops-test", "timestamps": stamps})
    metrics.observe_result({"source": None, "timestamps": {"ingested": 0.0}})  # no produced
    assert moved.delta("tagstream_end_to_end_seconds_count", source="hops-test") == 1
    assert moved.delta("tagstream_end_to_end_seconds_sum", source="hops-test") == pytest.approx(0.1)
    assert moved.delta("tagstream_end_to_end_seconds_count", source="unknown") == 0
    for stage, seconds in [("fetch", 0.05), ("model", 0.02), ("tweets_queue", 0.01)]:
        assert moved.delta("tagstream_result_stage_seconds_sum", stage=stage) == pytest.approx(
            seconds
        )
    assert moved.delta_sum("tagstream_result_stage_seconds_count") == len(metrics.RESULT_HOPS)


def test_lag_follows_the_assignment() -> None:
    moved = MetricDeltas()
    metrics.set_consumer_lag("lag-test", {("images", 0): 5, ("images", 1): 7})
    lag = {"group": "lag-test", "topic": "images"}
    assert moved.now("tagstream_consumer_lag_messages", **lag, partition="1") == 7
    metrics.set_consumer_lag("lag-test", {("images", 0): 2})  # partition 1 moved away
    assert moved.now("tagstream_consumer_lag_messages", **lag, partition="0") == 2
    assert (
        "tagstream_consumer_lag_messages",
        tuple(sorted({**lag, "partition": "1"}.items())),
    ) not in (moved.read())
