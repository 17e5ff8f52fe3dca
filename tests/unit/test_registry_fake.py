"""tests/registry.py answers confluent-kafka's stock SchemaRegistryClient as a registry
would: the interop tests lean on it, so it is held to the REST API here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError

from tests.registry import FakeSchemaRegistry

TWEET = (Path(__file__).resolve().parents[2] / "schemas" / "Tweet.avsc").read_text()


def _with(change) -> Schema:
    schema = json.loads(TWEET)
    change(schema)
    return Schema(json.dumps(schema), "AVRO")


def _added_field(schema: dict) -> None:
    schema["fields"].append({"name": "lang", "type": "string", "default": "und"})


def _added_required_field(schema: dict) -> None:
    schema["fields"].append({"name": "lang", "type": "string"})


def _widened_width(schema: dict) -> None:
    media = next(f for f in schema["fields"] if f["name"] == "media")["type"]["items"]
    next(f for f in media["fields"] if f["name"] == "width")["type"] = ["null", "long"]


def test_register_look_up_and_versions(schema_registry: FakeSchemaRegistry) -> None:
    client = SchemaRegistryClient({"url": schema_registry.url})
    first = client.register_schema("tweets-value", Schema(TWEET, "AVRO"))
    assert client.register_schema("tweets-value", Schema(TWEET, "AVRO")) == first
    # The same schema under another subject keeps its id, as upstream.
    assert client.register_schema("other-value", Schema(TWEET, "AVRO")) == first
    second = client.register_schema("tweets-value", _with(_added_field))
    assert second != first
    fresh = SchemaRegistryClient({"url": schema_registry.url})  # nothing cached
    assert json.loads(fresh.get_schema(first).schema_str) == json.loads(TWEET)
    latest = fresh.get_latest_version("tweets-value")
    assert (latest.schema_id, latest.version) == (second, 2)
    assert fresh.get_versions("tweets-value") == [1, 2]
    assert fresh.lookup_schema("tweets-value", Schema(TWEET, "AVRO")).version == 1
    assert sorted(fresh.get_subjects()) == ["other-value", "tweets-value"]
    with pytest.raises(SchemaRegistryError) as missing:
        fresh.get_schema(99)
    assert (missing.value.http_status_code, missing.value.error_code) == (404, 40403)


def test_compatibility_levels_and_checks(schema_registry: FakeSchemaRegistry) -> None:
    client = SchemaRegistryClient({"url": schema_registry.url})
    assert client.get_compatibility() == "BACKWARD"
    client.register_schema("tweets-value", Schema(TWEET, "AVRO"))
    assert client.test_compatibility("tweets-value", _with(_added_field))
    assert not client.test_compatibility("tweets-value", _with(_added_required_field))
    # int -> long promotes, so BACKWARD takes it; FULL does not (no way back).
    assert client.test_compatibility("tweets-value", _with(_widened_width))
    client.set_compatibility("tweets-value", "FULL")
    assert client.get_compatibility("tweets-value") == "FULL"
    assert not client.test_compatibility("tweets-value", _with(_widened_width))
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema("tweets-value", _with(_added_required_field))
    assert (refused.value.http_status_code, refused.value.error_code) == (409, 409)
    with pytest.raises(SchemaRegistryError) as invalid:
        client.register_schema("tweets-value", Schema('{"type": "record"}', "AVRO"))
    assert invalid.value.error_code == 42201
