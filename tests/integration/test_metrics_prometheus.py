"""The pipeline's figures read back through a real Prometheus equal its own accounting.

The whole pipeline runs as the commands a user runs (the Faust worker, an inference
consumer, the sink and a synthetic producer with faults of every kind) on the embedded
broker, each serving /metrics on a port of its own; Debian's ``prometheus`` scrapes them
every second. Once the Ledger (tests/pipeline.py) has accounted for every tweet taken in
(each a shed record, or each of its photos a result or a dead letter), the counters
Prometheus reports over its HTTP query API must equal the Ledger's counts, term by term,
and the gallery's status strip must read its figures from that Prometheus.

Skipped only where the ``prometheus`` binary is missing (``apt-get install prometheus``;
CI installs it).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

import pytest

from infra import prometheus
from infra.broker import free_port
from infra.prometheus import PrometheusServer, by_label, query, query_value
from models.manifest import Manifest
from tagstream.up import metrics_targets
from tests.pipeline import Ledger, RunningPipeline

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        prometheus.binary() is None,
        reason="needs the prometheus binary (apt-get install prometheus; CI installs it)",
    ),
]

STREAM = 80  # tweets
RATE = 40.0  # tweets/s


def last(name: str, by: str | None = None) -> str:
    """The sum of a counter's last values over the run (a process that has ended, the
    producer, keeps its last scrape): PromQL."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (last_over_time({name}[10m]))"


def figures(url: str) -> dict[str, float | None]:
    """What Prometheus reports for the run, in the Ledger's terms."""

    def value(expr: str) -> float:
        return query_value(url, expr) or 0.0

    produced = by_label(url, last("tagstream_records_produced_total", "topic"), "topic")
    dead = by_label(url, last("tagstream_dead_letters_total", "stage"), "stage")
    return {
        "tweets produced (source)": value(last("tagstream_source_tweets_produced_total")),
        "tweets on the topic": produced.get("tweets", 0.0),
        "tweets consumed (agent)": value(last("tagstream_agent_tweets_consumed_total")),
        "shed (agent)": value(last("tagstream_agent_tweets_shed_total")),
        "shed records": produced.get("tweets.shed", 0.0),
        "results (inference + cache)": value(last("tagstream_inference_images_total"))
        + value(last("tagstream_agent_cached_results_total")),
        "results (end-to-end histogram)": value(last("tagstream_end_to_end_seconds_count")),
        "result records": produced.get("hashtags", 0.0),
        "results seen by the sink": value(last("tagstream_sink_results_seen_total")),
        "dead letters": sum(dead.values()),
        "dead letter records": produced.get("deadletter", 0.0),
        # The agent's own balance: every tweet consumed was admitted, shed or undecodable.
        "admitted + shed + undecodable": value(last("tagstream_agent_tweets_admitted_total"))
        + value(last("tagstream_agent_tweets_shed_total"))
        + dead.get("decode_tweet", 0.0),
        # ... and every photo it sent on became a result or a dead letter of inference.
        "photos sent on": value(last("tagstream_agent_images_total")),
        "inference results + dead letters": value(last("tagstream_inference_images_total"))
        + sum(v for stage, v in dead.items() if stage in INFERENCE_STAGES),
        "fetch failures": value(last("tagstream_fetch_failures_total")),
        "fetch dead letters": dead.get("fetch", 0.0),
    }


INFERENCE_STAGES = ("decode_image", "decode_image_event", "encode_result")


def wanted(acc, dead_by_stage: Counter[str], *, cached: int) -> dict[str, float]:
    """The same terms, from the Ledger (and the agent's balances, which must hold)."""
    fetched = acc.photos - dead_by_stage["fetch"] - cached  # what reached inference
    return {
        "tweets produced (source)": acc.tweets_in,
        "tweets on the topic": acc.tweets_in,
        "tweets consumed (agent)": acc.tweets_in,
        "shed (agent)": acc.shed,
        "shed records": acc.shed,
        "results (inference + cache)": acc.results,
        "results (end-to-end histogram)": acc.results,
        "result records": acc.results,
        "results seen by the sink": acc.results,
        "dead letters": acc.dead_letters,
        "dead letter records": acc.dead_letters,
        "admitted + shed + undecodable": acc.tweets_in,
        "photos sent on": fetched,
        "inference results + dead letters": fetched,
        "fetch failures": dead_by_stage["fetch"],
        "fetch dead letters": dead_by_stage["fetch"],
    }


def test_prometheus_reports_the_ledgers_counts(
    make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    ports = {name: free_port() for name in ("faust", "infer", "sink", "producer")}
    prometheus_port = free_port()
    settings = make_settings(
        admission_mode="fixed",  # every photo admitted: the shed ones are the no_photo tweets
        admission_rate=10_000.0,
        admission_burst=10_000.0,
        fetch_allow_hosts=["127.0.0.1"],
        fetch_read_timeout_s=1.0,
        fetch_retries=1,
        fetch_max_bytes=1_000_000,
        model_dir=demo_model_dir,
        faust_web_port=ports["faust"],
        sink_port=ports["sink"],
        sink_dir=tmp_path / "sink",
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
        metrics_final_scrape_s=10.0,
    )
    server = PrometheusServer(
        tmp_path / "prometheus", metrics_targets(ports), port=prometheus_port, interval_s=1.0
    )
    ledger = Ledger(settings)
    with server, RunningPipeline(settings, tmp_path / "logs") as pipeline:

        def healthy() -> None:
            ended = {n: c for n, c in pipeline.exited().items() if (n, c) != ("producer", 0)}
            assert not ended, (ended, pipeline.logs())

        pipeline.start("faust")
        pipeline.start("infer", "infer", env={"TAGSTREAM_METRICS_PORT": str(ports["infer"])})
        pipeline.start("sink", "sink")
        server.wait_for_targets()  # the producer lives seconds: scraped from its start
        pipeline.start(
            "producer",
            "produce", "synthetic", "--rate", str(RATE), "--count", str(STREAM), "--seed", "3",
            "--image-base-url", image_server,
            env={"TAGSTREAM_METRICS_PORT": str(ports["producer"])},
        )  # fmt: skip
        acc = ledger.settle(want_tweets=STREAM, timeout_s=150, check=healthy)
        assert acc.tweets_in == STREAM and acc.lost == 0, (acc.line(), pipeline.logs())
        assert not acc.duplicates, acc.line()  # a clean run: the counts can be exact
        cached = sum(1 for r in ledger.results if r["cached"])
        expected = wanted(acc, ledger.dead_stages, cached=cached)
        # Prometheus catches up within a scrape or two (the producer has handed over its
        # last figures before it exited).
        deadline = time.monotonic() + 30
        while True:
            found = figures(server.url)
            if found == expected or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        print(f"\n{acc.line()}\nPrometheus: {json.dumps(found)}")
        mismatched = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
        assert not mismatched, f"Prometheus vs the Ledger: {mismatched}\n{acc.line()}"

        # The figures behind the dashboard are there too.
        shed = by_label(server.url, last("tagstream_agent_tweets_shed_total", "reason"), "reason")
        assert shed == {"no_photo": acc.shed}
        causes = by_label(server.url, last("tagstream_fetch_failures_total", "cause"), "cause")
        # The synthetic stream's bad photos, each failing for what it is (tests/unit/
        # test_fetch.py checks every cause).
        assert causes and set(causes) <= {
            "http_4xx",
            "http_5xx",
            "not_image",
            "too_large",
            "timeout",
        }
        assert sum(causes.values()) == ledger.dead_stages["fetch"], causes
        lag = by_label(server.url, "sum by (group) (tagstream_consumer_lag_messages)", "group")
        prefix = settings.topic_prefix
        groups = {f"{prefix}tagstream{suffix}" for suffix in ("", "-inference", "-sink")}
        assert groups <= set(lag), lag
        (model,) = query(server.url, "tagstream_inference_model_info")
        manifest = Manifest.load(demo_model_dir)
        assert model[0]["model_id"] == manifest.model_id
        assert model[0]["model_version"] == manifest.version
        assert (query_value(server.url, "sum(tagstream_fetch_seconds_count)") or 0) > 0
        batches = query_value(server.url, "sum(tagstream_inference_batch_size_images_count)")
        assert batches and batches >= 1
        up = prometheus.targets_up(server.url)
        assert up == {"faust": 1, "infer": 1, "sink": 1, "producer": 0}, up  # it has ended

        # Every process that is still running says it is well.
        for name in ("faust", "infer", "sink"):
            with _get(f"http://127.0.0.1:{ports[name]}/healthz") as resp:
                assert resp.status == 200, name

        # The gallery's status strip reads the same Prometheus.
        with _get(f"http://127.0.0.1:{ports['sink']}/api/status") as resp:
            status = json.loads(resp.read())
        assert status["source"] == "prometheus", status
        assert status["results_per_s"] > 0 and status["tweets_in_per_s"] > 0, status
        assert 0 < status["shed_fraction"] < 1 and status["latency_p99_s"] > 0, status
        assert set(status["lag"]) == set(lag), status


def _get(url: str):
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10)
