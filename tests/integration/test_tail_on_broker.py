"""`tagstream tail` on the embedded broker: every start, decoded lines, clear errors."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from infra.kafka import producer_config
from infra.record_producer import RecordProducer
from infra.tail import tail
from tests.helpers import run_cli, settings_env
from tests.samples import VALUES

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    # The command installs its own SIGINT/SIGTERM handlers; give pytest its own back.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_from_the_beginning_every_record_decoded_with_bytes_as_sizes(
    make_settings, monkeypatch, capsys
) -> None:
    settings = make_settings()
    result = VALUES["HashtagResult"]
    with RecordProducer(settings) as producer:
        producer.send("hashtags", result, key="t1")
        producer.send_raw(settings.topic("hashtags"), key="t2", value=b"not avro")
    code = run_cli(
        monkeypatch,
        settings_env(settings),
        "tail",
        "hashtags",
        "--from-beginning",
        "--limit",
        "2",
        "--json",
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = {line["key"]: line for line in _lines(out)}
    good, bad = lines["t1"], lines["t2"]
    assert good["topic"] == settings.topic("hashtags") and good["timestamp"].endswith("Z")
    assert good["value"] == {**result, "thumbnail": f"<{len(result['thumbnail'])} bytes>"}
    assert bad["size"] == 8 and "value" not in bad
    assert bad["error"].startswith("cannot decode HashtagResult: unknown framing, starts 6e 6f")


def test_by_default_only_records_after_the_start(make_settings) -> None:
    settings = make_settings()
    old = [dict(VALUES["ShedRecord"], tweet_id=f"old-{i}") for i in range(5)]
    # One batch of several records: tansu's high watermark stops at the batch's first
    # record, so a tail that trusted it would show the others as new.
    with RecordProducer(settings) as producer:
        for value in old:
            producer.send("tweets.shed", value, key="same-partition")
    out, ready, stop = io.StringIO(), threading.Event(), threading.Event()
    thread = threading.Thread(
        target=tail,
        args=(settings, "tweets.shed"),
        kwargs={"out": out, "limit": 1, "on_ready": ready.set, "stop": stop, "as_json": True},
        daemon=True,
    )
    thread.start()
    try:
        assert ready.wait(30), "the tail never reached the end of every partition"
        with RecordProducer(settings) as producer:
            producer.send("tweets.shed", dict(VALUES["ShedRecord"], tweet_id="new"), key="k")
        thread.join(30)
        assert not thread.is_alive()
    finally:
        stop.set()
    assert [line["value"]["tweet_id"] for line in _lines(out.getvalue())] == ["new"]


def test_from_an_offset_in_the_plain_form(make_settings, monkeypatch, capsys) -> None:
    settings = make_settings()
    with RecordProducer(settings) as producer:
        for depth in range(3):
            value = dict(VALUES["CapacityReport"], queue_depth=depth)
            producer.send("capacity", value, key=f"c{depth}")
    code = run_cli(
        monkeypatch, settings_env(settings), "tail", "capacity", "--from", "1", "--limit", "2"
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split(" ", 1)[0] for line in out] == ["0@1", "0@2"]
    assert [json.loads(line.split(" ", 3)[3])["queue_depth"] for line in out] == [1, 2]
    assert [line.split(" ")[2] for line in out] == ["key=c1", "key=c2"]


def test_since_selects_by_record_time_even_where_the_broker_ignores_it(
    make_settings, monkeypatch, capsys
) -> None:
    settings = make_settings()
    now_ms = int(time.time() * 1000)
    encoder = RecordProducer(settings)
    producer = Producer(producer_config(settings))
    for offset, age_ms in enumerate((2 * 3600_000, 60_000)):
        full, data = encoder.encode("deadletter", dict(VALUES["DeadLetter"], source_offset=offset))
        producer.produce(full, value=data, key=b"d", timestamp=now_ms - age_ms)
    assert producer.flush(10) == 0
    encoder.close()
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now_ms - 3600_000) / 1000))
    code = run_cli(
        monkeypatch,
        settings_env(settings),
        "tail",
        "deadletter",
        "--since",
        since,
        "--limit",
        "1",
        "--json",
    )
    lines = _lines(capsys.readouterr().out)
    assert code == 0
    assert [(line["offset"], line["value"]["source_offset"]) for line in lines] == [(1, 1)]


def test_unknown_and_missing_topics_are_one_line_errors(make_settings, monkeypatch, capsys) -> None:
    settings = make_settings()
    env = settings_env(settings)
    assert run_cli(monkeypatch, env, "tail", "hashtag") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown topic 'hashtag'; tagstream topics: tweets, images")
    env["TAGSTREAM_TOPIC_PREFIX"] = "never-created-"
    assert run_cli(monkeypatch, env, "tail", "hashtags") == 1
    err = capsys.readouterr().err
    assert "error: topic 'never-created-hashtags' does not exist on the cluster" in err
    assert "Traceback" not in err
