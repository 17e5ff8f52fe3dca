"""The whole pipeline on the embedded broker: every tweet and every photo accounted for.

Starts the Faust worker (`faust -A processors worker`) and an inference consumer
(`tagstream infer`) as processes, produces synthetic tweets of every kind plus a
malformed record, and reads `hashtags`, `tweets.shed` and `deadletter` back.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from infra.broker import free_port
from infra.image_server import truth_from_url
from infra.record_producer import RecordProducer
from producers.synthetic import SyntheticTweets
from producers.tweets import tweet_from_stream_line
from schemas.records import now_ms, photos
from tagstream.up import ProcessGroup, child_env, faust_argv, tagstream_argv
from tests.helpers import KafkaReader, settings_env

pytestmark = pytest.mark.integration

OUTPUTS = {"hashtags": "HashtagResult", "tweets.shed": "ShedRecord", "deadletter": "DeadLetter"}


def start_stage(settings, tmp_path, *names: str) -> ProcessGroup:
    group = ProcessGroup(env=child_env(settings_env(settings)), log_dir=tmp_path / "logs")
    for name in names:
        group.start(name, faust_argv(settings) if name == "faust" else tagstream_argv(name))
    return group


def logs(tmp_path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in (tmp_path / "logs").glob("*.log")
    )


def test_every_tweet_and_photo_is_accounted_for_exactly_once(
    make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    settings = make_settings(
        admission_mode="fixed",  # every photo admitted: this test is about the rest
        admission_rate=10_000.0,
        admission_burst=10_000.0,
        fetch_allow_hosts=["127.0.0.1"],
        fetch_read_timeout_s=1.0,
        fetch_retries=1,
        fetch_max_bytes=1_000_000,
        model_dir=demo_model_dir,
        faust_web_port=free_port(),
    )
    generator = SyntheticTweets(image_base_url=image_server, seed=7, slow_delay_s=5.0)
    tweets = [
        tweet_from_stream_line(generator.line(n), source="synthetic", ingested_at_ms=now_ms())
        for n in range(300)
    ]
    expected_photos = {p["media_key"]: p["url"] for t in tweets for p in photos(t)}
    no_photo = {t["id"] for t in tweets if not photos(t)}
    kinds = Counter(
        "none"
        if not t["media"]
        else "no_photo"
        if not photos(t)
        else "multi"
        if len(photos(t)) > 1
        else "one"
        for t in tweets
    )
    assert kinds["none"] and kinds["no_photo"] and kinds["multi"] and kinds["one"], kinds
    faults = [u for u in expected_photos.values() if truth_from_url(u) is None or "/slow/" in u]
    assert {"/status/", "/html/", "/huge/", "/corrupt/", "/slow/"} <= {
        "/" + u.split("/")[3] + "/" for u in faults
    }

    group = start_stage(settings, tmp_path, "faust", "infer")
    reader = KafkaReader(settings, OUTPUTS)
    try:
        with RecordProducer(settings) as producer:
            raw = b"\x00\x01 this is not an Avro record"
            producer.send_raw(settings.topic("tweets"), key=b"garbage", value=raw)
            for tweet in tweets:
                producer.send("tweets", tweet, key=tweet["id"])

        def accounted(found) -> bool:
            assert not group.exited(), logs(tmp_path)
            done = {r["media_key"] for r in found["hashtags"]}
            done |= {r["media_key"] for r in found["deadletter"] if r["media_key"]}
            shed = {r["tweet_id"] for r in found["tweets.shed"]}
            return (
                done >= set(expected_photos)
                and shed >= no_photo
                and any(r["stage"] == "decode_tweet" for r in found["deadletter"])
            )

        found = reader.read_until(accounted, timeout_s=240)
        assert not group.exited(), logs(tmp_path)
        assert accounted(found), f"not all accounted for after 240 s\n{logs(tmp_path)}"
        time.sleep(2.0)  # anything extra (a duplicate) would arrive now
        found = reader.read_until(lambda _: False, timeout_s=2.0)
    finally:
        reader.close()
        group.stop_all()

    results, shed, dead = found["hashtags"], found["tweets.shed"], found["deadletter"]
    # Exactly once: no photo twice, nothing both a result and a dead letter.
    result_keys = Counter(r["media_key"] for r in results)
    dead_keys = Counter(r["media_key"] for r in dead if r["media_key"])
    assert max(result_keys.values()) == 1 and (not dead_keys or max(dead_keys.values()) == 1)
    assert not set(result_keys) & set(dead_keys)
    assert set(result_keys) | set(dead_keys) == set(expected_photos)
    assert Counter(r["tweet_id"] for r in shed) == Counter(no_photo)
    assert {r["reason"] for r in shed} == {"no_photo"}
    # The malformed record is a dead letter with where it came from and its bytes.
    (garbage,) = [r for r in dead if r["stage"] == "decode_tweet"]
    assert garbage["source_topic"] == settings.topic("tweets") and garbage["source_offset"] >= 0
    assert garbage["payload"].startswith(b"\x00\x01") and garbage["error_class"] == "CodecError"
    # Each kind of bad photo fails at the stage where it should.
    stage_of = {r["media_key"]: (r["stage"], r["error_class"]) for r in dead if r["media_key"]}
    for key, url in expected_photos.items():
        kind = url.split("/")[3]
        if kind in ("status", "html", "huge", "slow"):
            assert stage_of[key][0] == "fetch", (url, stage_of.get(key))
        elif kind == "corrupt":
            assert stage_of[key] == ("decode_image", "DecodeImageError"), url
        else:
            assert key in result_keys, (url, stage_of.get(key))
    # Good photos carry the hashtag of the class they were drawn from.
    good = [r for r in results if truth_from_url(r["url"])]
    right = [r for r in good if r["top_class"] == truth_from_url(r["url"])]
    assert len(right) / len(good) >= 0.9, Counter(
        (truth_from_url(r["url"]), r["top_class"]) for r in good
    )
    for r in right:
        expected_tag = [] if r["top_class"] == "others" else [f"#{r['top_class']}"]
        assert set(expected_tag) <= set(r["hashtags"]) and "#others" not in r["hashtags"]
    # Every stage stamped its time, in order.
    stages = [
        "ingested",
        "received",
        "admitted",
        "fetch_start",
        "fetched",
        "consumed",
        "decoded",
        "inferred",
        "produced",
    ]
    for r in results:
        times = [r["timestamps"][s] for s in stages]
        assert times == sorted(times), r["timestamps"]
        assert r["thumbnail"] and r["thumbnail"][:2] == b"\xff\xd8"
    print(
        f"\naccounting: {len(tweets) + 1} records in -> {len(results)} results, {len(shed)} shed, "
        f"{len(dead)} dead letters; good photos right {len(right)}/{len(good)}"
    )


def test_over_rate_tweets_are_shed_on_record(make_settings, image_server, tmp_path) -> None:
    settings = make_settings(
        admission_mode="fixed",
        admission_rate=1.0,
        admission_burst=3.0,
        fetch_allow_hosts=["127.0.0.1"],
        faust_web_port=free_port(),
    )
    generator = SyntheticTweets(
        image_base_url=image_server,
        seed=3,
        fault_fraction=0.0,
        no_media_fraction=0.0,
        video_fraction=0.0,
    )
    tweets = [
        tweet_from_stream_line(generator.line(n), source="synthetic", ingested_at_ms=now_ms())
        for n in range(40)
    ]
    tweets = [t for t in tweets if photos(t)]
    photo_keys = {t["id"]: {p["media_key"] for p in photos(t)} for t in tweets}
    group = start_stage(settings, tmp_path, "faust")
    reader = KafkaReader(settings, {"images": "ImageEvent", "tweets.shed": "ShedRecord"})
    try:
        with RecordProducer(settings) as producer:
            for tweet in tweets:
                producer.send("tweets", tweet, key=tweet["id"])

        def accounted(found) -> bool:
            assert not group.exited(), logs(tmp_path)
            seen = {r["tweet_id"] for r in found["images"]} | {
                r["tweet_id"] for r in found["tweets.shed"]
            }
            return seen >= set(photo_keys)

        found = reader.read_until(accounted, timeout_s=120)
        assert accounted(found), logs(tmp_path)
    finally:
        reader.close()
        group.stop_all()
    shed = found["tweets.shed"]
    admitted = {r["tweet_id"] for r in found["images"]}
    assert {r["reason"] for r in shed} == {"over_rate"}
    assert 3 <= len(admitted) <= 10, len(admitted)  # the burst, plus about 1/s of refill
    assert not admitted & {r["tweet_id"] for r in shed}
    for record in shed:
        assert set(record["media_keys"]) == photo_keys[record["tweet_id"]]
        assert record["admission_rate"] == 1.0 and record["tokens"] < 1.0
        assert record["observed_rate"] > 0
