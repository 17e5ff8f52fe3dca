"""The closed loop on the embedded broker: a deliberately slowed inference consumer and a
burst at five times its capacity. Every tweet is accounted for (a result, a shed record
or dead letters) and the admitted photos meet the latency target."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from infra.broker import free_port
from infra.record_producer import RecordProducer
from producers.tweets import tweet_from_stream_line
from schemas.records import now_ms
from tests.pipeline import Ledger, RunningPipeline

pytestmark = pytest.mark.integration

CAPACITY = 20.0  # images/s: the slowed consumer
OFFERED = 100.0  # tweets/s of one photo each: 5x
BURST = 400


def test_a_5x_burst_is_shed_to_capacity_and_admitted_photos_meet_the_target(
    make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    settings = make_settings(
        fetch_allow_hosts=["127.0.0.1"],
        model_dir=demo_model_dir,
        faust_web_port=free_port(),
        infer_throttle_images_per_s=CAPACITY,
        batch_max_size=8,
        result_cache_size=0,  # every photo is new here anyway; keep the counts plain
    )
    target_ms = settings.latency_target_ms
    ledger = Ledger(settings)
    with RunningPipeline(settings, tmp_path / "logs") as pipeline:
        pipeline.start("faust")
        pipeline.start("infer", "infer")
        deadline = time.monotonic() + 60
        while "inference consumer" not in pipeline.log_of("infer") and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3.0)  # its first capacity reports reach the agent
        with RecordProducer(settings) as producer:
            started = time.monotonic()
            for n in range(BURST):
                # Half match a targeted rule (a class of the model), half a general one.
                tag = "cats" if n % 2 else "general"
                line = {
                    "data": {
                        "id": f"7{n:05d}", "text": "x", "attachments": {"media_keys": [f"3_{n}"]}
                    },
                    "includes": {
                        "media": [
                            {"media_key": f"3_{n}", "type": "photo",
                             "url": f"{image_server}/img/cats/{n}.jpg"}
                        ]
                    },
                    "matching_rules": [{"id": "1", "tag": tag}],
                }  # fmt: skip
                tweet = tweet_from_stream_line(line, source="test", ingested_at_ms=now_ms())
                producer.send("tweets", tweet, key=tweet["id"])
                delay = started + (n + 1) / OFFERED - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        acc = ledger.settle(want_tweets=BURST, timeout_s=120)
        assert not pipeline.exited(), pipeline.logs()
    ledger.close()
    latencies = sorted(
        r["timestamps"]["produced"] - r["timestamps"]["ingested"] for r in ledger.results
    )
    reasons = Counter(r["reason"] for r in ledger.shed)
    admitted = Counter(int(r["tweet_id"]) % 2 for r in ledger.results)  # 1: targeted rule
    print(
        f"\n5x burst on a {CAPACITY:g} images/s consumer: {acc.line()}; shed {dict(reasons)}; "
        f"latency p50 {latencies[len(latencies) // 2]:.0f} ms, max {latencies[-1]:.0f} ms; "
        f"admitted targeted {admitted[1]}, general {admitted[0]}"
    )
    assert acc.tweets_in == BURST and acc.lost == 0, acc.line()
    assert set(reasons) <= {"over_capacity", "deadline"} and acc.shed > BURST / 2, reasons
    # What the consumer could do in the burst's time was done, and in time.
    assert len(ledger.results) >= 0.7 * CAPACITY * BURST / OFFERED, len(ledger.results)
    assert latencies[-1] <= target_ms, latencies[-10:]
    # The targeted tweets were served first.
    assert admitted[1] > 2 * admitted[0], admitted
    assert all(r["controller_mode"] == "closed_loop" for r in ledger.shed)
