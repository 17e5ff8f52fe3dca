"""Our records, read by other people's code alone: the interop tests of the record contract.

Every record type is written to the embedded broker by our own RecordProducer, then read
back by examples/read_topic.py in a fresh interpreter, run with ``-X importtime`` so the
test sees every module it imported: none of ours. It decodes with confluent-kafka's stock
`AvroDeserializer` on a schema registry (the Confluent REST API fake of tests/registry.py)
or, registry-less, with the Apache ``avro`` package, the ``.avsc`` files and the
fingerprint alone.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.record_producer import RecordProducer
from infra.settings import Settings
from schemas.codec import Codec
from tests.helpers import doc_snippets
from tests.registry import FakeSchemaRegistry
from tests.samples import TOPICS, VALUES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OURS = {"tagstream", "producers", "processors", "models", "infra", "schemas", "tests"}


def _jsonable(value: Any) -> Any:
    """A value as read_topic prints it: bytes as base64."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _write_every_record(settings: Settings, codec: Codec | None = None) -> None:
    with RecordProducer(settings, codec=codec) as producer:
        for record, value in VALUES.items():
            producer.send(TOPICS[record], value, key=f"key-{record}")


def _stock_read(settings: Settings, topics: list[str], *options: str) -> dict[str, list[dict]]:
    """The lines read_topic prints for ``topics`` (short names), by short name."""
    names = {settings.topic(t): t for t in topics}
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "examples.read_topic"]
        + ["--bootstrap", settings.bootstrap(), *options, *names],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in run.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "confluent_kafka" in imported and "examples" in imported
    assert not imported & OURS, f"the stock reader imported {sorted(imported & OURS)}"
    found: dict[str, list[dict]] = {t: [] for t in topics}
    for line in run.stdout.splitlines():
        item = json.loads(line)
        found[names[item["topic"]]].append(item)
    return found


def _assert_every_record(found: dict[str, list[dict]]) -> None:
    for record, value in VALUES.items():
        lines = found[TOPICS[record]]
        assert len(lines) == 1, (record, lines)
        assert "error" not in lines[0], lines[0]
        assert lines[0]["key"] == f"key-{record}"
        assert lines[0]["value"] == _jsonable(value), record


def test_the_stock_avro_deserializer_reads_every_record_from_the_registry(
    make_settings, schema_registry: FakeSchemaRegistry
) -> None:
    settings = make_settings(schema_registry_url=schema_registry.url)
    _write_every_record(settings)
    # TopicNameStrategy: one subject per topic, named as any Confluent consumer expects.
    assert sorted(schema_registry.subjects) == sorted(
        f"{settings.topic(t)}-value" for t in TOPICS.values()
    )
    found = _stock_read(settings, list(TOPICS.values()), "--registry", schema_registry.url)
    _assert_every_record(found)


def test_apache_avro_reads_every_single_object_record_from_the_avsc_files(
    make_settings,
) -> None:
    settings = make_settings()
    _write_every_record(settings)
    found = _stock_read(settings, list(TOPICS.values()), "--schemas", str(REPO / "schemas"))
    _assert_every_record(found)


def _older_tweet() -> tuple[dict[str, Any], dict[str, Any]]:
    """A Tweet schema from before `source` and `replay_run_id`, and a value of it."""
    schema = json.loads((REPO / "schemas" / "Tweet.avsc").read_text())
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in ("source", "replay_run_id")]
    value = {k: v for k, v in VALUES["Tweet"].items() if k in {f["name"] for f in schema["fields"]}}
    return schema, value


def test_stock_readers_read_what_an_older_release_wrote(
    make_settings, schema_registry: FakeSchemaRegistry, tmp_path: Path
) -> None:
    older, value = _older_tweet()
    today = {**value, "source": "unknown", "replay_run_id": None}

    # Single-object: the older schema is kept beside the current ones, as schemas/history/
    # keeps every release; Apache avro reads the old bytes in today's shape.
    settings = make_settings()
    _write_tweet(settings, older, value)
    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas", schemas, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (schemas / "history" / "0.0.9").mkdir(parents=True)
    (schemas / "history" / "0.0.9" / "Tweet.avsc").write_text(json.dumps(older))
    found = _stock_read(settings, ["tweets"], "--schemas", str(schemas))
    assert [line["value"] for line in found["tweets"]] == [_jsonable(today)]

    # Registry: the stock deserializer, given today's .avsc as reader schema.
    from examples.records import registry_reader

    settings = make_settings(schema_registry_url=schema_registry.url)
    _write_tweet(settings, older, value)
    read = registry_reader(
        schema_registry.url, reader_schema=(REPO / "schemas" / "Tweet.avsc").read_text()
    )
    raw = _raw_values(settings, "tweets")
    assert [read(data, settings.topic("tweets")) for data in raw] == [today]


def _write_tweet(settings: Settings, schema: dict[str, Any], value: dict[str, Any]) -> None:
    older = Codec(registry_url=settings.schema_registry_url, reader_schemas=[schema])
    with RecordProducer(settings, codec=older) as producer:
        producer.send("tweets", value, key=value["id"])


def _raw_values(settings: Settings, topic: str) -> list[bytes]:
    from examples.read_topic import read_topics

    lines = read_topics(settings.bootstrap(), [settings.topic(topic)], lambda data, _: data)
    return [base64.b64decode(line["value"]) for line in lines]


def test_the_docs_registry_snippet_reads_hashtags(
    make_settings, schema_registry: FakeSchemaRegistry
) -> None:
    settings = make_settings(schema_registry_url=schema_registry.url)
    results = [VALUES["HashtagResult"], dict(VALUES["HashtagResult"], media_key="3_2")]
    with RecordProducer(settings) as producer:
        for result in results:
            producer.send("hashtags", result, key=result["tweet_id"])
    hashtag_results = doc_snippets(REPO / "docs" / "consumers.md")["hashtag_results"]
    found = hashtag_results["hashtag_results"](
        settings.bootstrap(),
        schema_registry.url,
        f"docs-{settings.topic_prefix}",
        topic=settings.topic("hashtags"),
        **{"session.timeout.ms": settings.session_timeout_ms},
    )
    assert sorted((next(found) for _ in results), key=lambda r: r["media_key"]) == sorted(
        results, key=lambda r: r["media_key"]
    )
    found.close()
