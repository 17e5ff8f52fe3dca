"""Tests of schemas.codec: both wire formats, schema evolution, and every way to fail."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from infra.exceptions import CodecError, RegistryUnavailableError
from schemas import RECORD_NAMES, Codec
from schemas.evolution import HISTORY_DIR, releases
from tests.registry import FakeSchemaRegistry
from tests.samples import TOPICS, VALUES

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

#: What a reader of today's Tweet fills in for data written before the source-neutral fields.
TWEET_DEFAULTS = {
    "network": "x",
    "post_id": None,
    "post_url": None,
    "langs": [],
    "tags": [],
    "operation": "create",
    "revision": None,
}


def _shipped(record: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{record}.avsc").read_text(encoding="utf-8"))


def _tweet_v2() -> dict[str, Any]:
    """Tweet with one more field, defaulted: what a newer deployment reads with."""
    schema = _shipped("Tweet")
    schema["fields"].append({"name": "lang", "type": "string", "default": "und"})
    return schema


def _tweet_v0() -> dict[str, Any]:
    """Tweet before `source`, `replay_run_id` and the open networks' fields existed: an
    older writer."""
    schema = _shipped("Tweet")
    added = ("source", "replay_run_id", *TWEET_DEFAULTS)
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in added]
    return schema


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO as the Avro specification writes it, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def _single_object(schema: dict[str, Any], value: dict[str, Any]) -> bytes:
    """Single-object bytes built by hand, to check the codec against the spec."""
    parsed = fastavro.parse_schema(schema)
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, value)
    return b"\xc3\x01" + struct.pack("<Q", _crc64_avro(canonical.encode())) + body.getvalue()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Round trips ------------------------------------------------------------------------------


def test_every_shipped_record_has_a_value() -> None:
    assert set(RECORD_NAMES) == set(VALUES)
    assert set(RECORD_NAMES) == {p.stem for p in SCHEMA_DIR.glob("*.avsc")}


@pytest.mark.parametrize("record", sorted(VALUES))
def test_single_object_round_trip(record: str) -> None:
    codec = Codec()
    data = codec.encode(record, VALUES[record])
    assert data[:2] == b"\xc3\x01"
    assert codec.decode(record, data) == VALUES[record]
    assert codec.decode(f"tagstream.{record}", memoryview(data)) == VALUES[record]


@pytest.mark.parametrize("record", sorted(VALUES))
def test_single_object_matches_the_spec(record: str) -> None:
    # The fingerprint is CRC-64-AVRO of the canonical form, little-endian, as the spec says.
    assert Codec().encode(record, VALUES[record]) == _single_object(
        _shipped(record), VALUES[record]
    )


@pytest.mark.parametrize("record", sorted(VALUES))
def test_registry_round_trip(record: str, schema_registry: FakeSchemaRegistry) -> None:
    writer = Codec(registry_url=schema_registry.url)
    data = writer.encode(record, VALUES[record], topic=TOPICS[record])
    assert data[:1] == b"\x00"
    schema_id = struct.unpack(">I", data[1:5])[0]
    assert schema_registry.subjects[f"{TOPICS[record]}-value"] == [schema_id]
    assert json.loads(schema_registry.schemas[schema_id]) == _shipped(record)
    assert writer.decode(record, data) == VALUES[record]
    # A fresh process knows no id: it fetches the writer schema once.
    before = len(schema_registry.requests_of("GET"))
    reader = Codec(registry_url=schema_registry.url)
    assert reader.decode(record, data) == VALUES[record]
    assert reader.decode(record, data) == VALUES[record]
    assert schema_registry.requests_of("GET")[before:] == [f"/schemas/ids/{schema_id}"]


def test_registry_caches_ids_and_uses_record_name_without_topic(
    schema_registry: FakeSchemaRegistry,
) -> None:
    codec = Codec(registry_url=schema_registry.url)
    first = codec.encode("Tweet", VALUES["Tweet"])
    second = codec.encode("Tweet", VALUES["Tweet"])
    assert first[:5] == second[:5]
    assert list(schema_registry.subjects) == ["tagstream.Tweet"]
    posts = [r for r in schema_registry.requests if r[0] == "POST"]
    assert [path for _, path, _, _ in posts] == ["/subjects/tagstream.Tweet/versions"]
    headers = {k.lower(): v for k, v in posts[0][3].items()}
    assert headers["content-type"] == "application/vnd.schemaregistry.v1+json"
    assert "authorization" not in headers


def test_one_schema_id_for_every_subject_of_a_record(schema_registry: FakeSchemaRegistry) -> None:
    codec = Codec(registry_url=schema_registry.url)
    a = codec.encode("DeadLetter", VALUES["DeadLetter"], topic="deadletter")
    b = codec.encode("DeadLetter", VALUES["DeadLetter"], topic="t1-deadletter")
    assert a == b
    assert sorted(schema_registry.subjects) == ["deadletter-value", "t1-deadletter-value"]


def test_registry_credentials_go_in_a_header(schema_registry: FakeSchemaRegistry) -> None:
    url = schema_registry.url.replace("http://", "http://svc%40team:s3cret@")
    codec = Codec(registry_url=url)
    codec.encode("CapacityReport", VALUES["CapacityReport"], topic="capacity")
    headers = {k.lower(): v for k, v in schema_registry.requests[-1][3].items()}
    assert headers["authorization"] == "Basic " + base64.b64encode(b"svc@team:s3cret").decode()
    assert "s3cret" not in repr(codec)


def test_registry_codec_reads_single_object_bytes(schema_registry: FakeSchemaRegistry) -> None:
    data = Codec().encode("ShedRecord", VALUES["ShedRecord"])
    codec = Codec(registry_url=schema_registry.url)
    assert codec.decode("ShedRecord", data) == VALUES["ShedRecord"]


# The stock serdes and ours read each other -------------------------------------------------


@pytest.mark.parametrize("record", sorted(VALUES))
def test_the_stock_deserializer_reads_our_bytes(
    record: str, schema_registry: FakeSchemaRegistry
) -> None:
    data = Codec(registry_url=schema_registry.url).encode(
        record, VALUES[record], topic=TOPICS[record]
    )
    # As a consumer in another service would: defaults only, the writer schema as reader.
    stock = AvroDeserializer(SchemaRegistryClient({"url": schema_registry.url}))
    ctx = SerializationContext(TOPICS[record], MessageField.VALUE)
    assert stock(data, ctx) == VALUES[record]


@pytest.mark.parametrize("record", sorted(VALUES))
def test_we_read_the_stock_serializers_bytes(
    record: str, schema_registry: FakeSchemaRegistry
) -> None:
    client = SchemaRegistryClient({"url": schema_registry.url})
    stock = AvroSerializer(client, (SCHEMA_DIR / f"{record}.avsc").read_text())
    data = stock(VALUES[record], SerializationContext(TOPICS[record], MessageField.VALUE))
    assert Codec(registry_url=schema_registry.url).decode(record, data) == VALUES[record]


def test_from_settings() -> None:
    class FakeSettings:
        schema_registry_url = None

    codec = Codec.from_settings(FakeSettings())  # type: ignore[arg-type]
    assert codec.encode("CapacityReport", VALUES["CapacityReport"])[:2] == b"\xc3\x01"


# Schema evolution ---------------------------------------------------------------------


def test_newer_reader_fills_added_field_with_default() -> None:
    old_bytes = Codec().encode("Tweet", VALUES["Tweet"])
    newer = Codec(reader_schemas=[_tweet_v2()])
    assert newer.decode("Tweet", old_bytes) == {**VALUES["Tweet"], "lang": "und"}
    # ...and what the newer codec writes it reads back.
    new_bytes = newer.encode("Tweet", {**VALUES["Tweet"], "lang": "en"})
    assert newer.decode("Tweet", new_bytes)["lang"] == "en"


def test_newer_reader_through_the_registry(schema_registry: FakeSchemaRegistry) -> None:
    codec = Codec(registry_url=schema_registry.url)
    old_bytes = codec.encode("Tweet", VALUES["Tweet"], topic="tweets")
    newer = Codec(registry_url=schema_registry.url, reader_schemas=[_tweet_v2()])
    assert newer.decode("Tweet", old_bytes) == {**VALUES["Tweet"], "lang": "und"}
    # The newer writer's schema joins the subject: it passes the registry's FULL check.
    schema_registry.subject_levels["tweets-value"] = "FULL"
    new_bytes = newer.encode("Tweet", {**VALUES["Tweet"], "lang": "en"}, topic="tweets")
    assert len(schema_registry.subjects["tweets-value"]) == 2
    # ...and an older reader reads it, without the field it does not know.
    assert codec.decode("Tweet", new_bytes) == VALUES["Tweet"]


@pytest.mark.parametrize("release", releases())
@pytest.mark.parametrize("record", sorted(VALUES))
def test_data_written_by_every_release_stays_readable(
    record: str, release: str, schema_registry: FakeSchemaRegistry
) -> None:
    old_schema = (HISTORY_DIR / release / f"{record}.avsc").read_text()
    old_fields = {f["name"] for f in json.loads(old_schema)["fields"]}
    value = {k: v for k, v in VALUES[record].items() if k in old_fields}
    # Single-object, as that release wrote it: its fingerprint is known to the codec.
    old_bytes = _single_object(json.loads(old_schema), value)
    decoded = Codec().decode(record, old_bytes)
    assert {k: decoded[k] for k in value} == value
    # Through the registry, written by the stock serializer with that release's schema.
    client = SchemaRegistryClient({"url": schema_registry.url})
    ctx = SerializationContext(TOPICS[record], MessageField.VALUE)
    registry_bytes = AvroSerializer(client, old_schema)(value, ctx)
    decoded = Codec(registry_url=schema_registry.url).decode(record, registry_bytes)
    assert {k: decoded[k] for k in value} == value


def test_older_writer_needs_registering() -> None:
    added = ("source", "replay_run_id", *TWEET_DEFAULTS)
    value = {k: v for k, v in VALUES["Tweet"].items() if k not in added}
    old_bytes = _single_object(_tweet_v0(), value)
    codec = Codec()
    with pytest.raises(CodecError, match="unknown schema fingerprint"):
        codec.decode("Tweet", old_bytes)
    codec.register_writer_schema(_tweet_v0())
    assert codec.decode("Tweet", old_bytes) == {
        **value,
        "source": "unknown",
        "replay_run_id": None,
        **TWEET_DEFAULTS,
    }


def test_release_schemas_are_known_writers(monkeypatch: pytest.MonkeyPatch) -> None:
    # What schemas/history/ does once a release differs from today: an older Tweet there
    # makes its single-object bytes readable with no registering at all.
    import schemas.codec

    added = ("source", "replay_run_id", *TWEET_DEFAULTS)
    value = {k: v for k, v in VALUES["Tweet"].items() if k not in added}
    old_bytes = _single_object(_tweet_v0(), value)
    older = schemas.codec._build_schema(_tweet_v0(), origin="history/0.0.9/Tweet.avsc")
    monkeypatch.setattr(schemas.codec, "_HISTORY", [older])
    decoded = Codec().decode("Tweet", old_bytes)
    assert decoded == {**value, "source": "unknown", "replay_run_id": None, **TWEET_DEFAULTS}


def test_unresolvable_writer_schema() -> None:
    # A writer whose field changed type in a way Avro cannot resolve.
    schema = _shipped("CapacityReport")
    schema["fields"][3] = {"name": "queue_depth", "type": "string"}
    value = {**VALUES["CapacityReport"], "queue_depth": "lots"}
    codec = Codec()
    codec.register_writer_schema(schema)
    with pytest.raises(CodecError, match="cannot decode CapacityReport: writer schema"):
        codec.decode("CapacityReport", _single_object(schema, value))


def test_register_writer_schema_rejects_non_schemas() -> None:
    with pytest.raises(CodecError, match="not an Avro record schema"):
        Codec().register_writer_schema({"type": "string"})
    with pytest.raises(CodecError, match="invalid Avro schema"):
        Codec().register_writer_schema({"type": "record", "name": "X", "fields": [{"name": "a"}]})


# Garbage in ------------------------------------------------------------------------------


def _tweet_bytes() -> bytes:
    return Codec().encode("Tweet", VALUES["Tweet"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "cannot decode Tweet: empty input"),
        (b'{"id": "1"}', r"unknown framing, starts 7b 22 69 64 22 3a 20 22 \.\.\. \(11 bytes\)"),
        (b"\xc3\x02" + bytes(20), "unknown framing, starts c3 02"),
        (b"\xc3\x01\x01\x02", "single-object header truncated: c3 01 01 02"),
        (b"\x00\x00\x01", "Confluent header truncated"),
        (b"\x00\x00\x00\x00\x07\x02a", "schema id 7.*no schema registry is configured"),
        (_tweet_bytes()[:-9], r"body truncated \(\d+ bytes after header\)"),
        (_tweet_bytes()[:12], "body truncated"),
        (_tweet_bytes() + b"\x00", "1 bytes left after the body"),
        (
            b"\xc3\x01" + bytes.fromhex("0123456789abcdef") + b"\x02a",
            "fingerprint 0123456789abcdef",
        ),
    ],
)
def test_garbage_raises_codec_error(data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message) as info:
        Codec().decode("Tweet", data)
    assert str(info.value).startswith("cannot decode Tweet: ")


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_raise_codec_error(seed: int) -> None:
    rng = random.Random(seed)
    noise = rng.randbytes(rng.randrange(1, 200))
    with pytest.raises(CodecError, match="cannot decode Tweet: "):
        Codec().decode("Tweet", noise)


@pytest.mark.parametrize("seed", range(50))
def test_corrupt_body_behind_valid_header_raises_codec_error(seed: int) -> None:
    # The hard case: the header is right, so every byte of noise reaches fastavro.
    rng = random.Random(seed)
    header = _tweet_bytes()[:10]
    data = header + rng.randbytes(rng.randrange(0, 120))
    try:
        Codec().decode("Tweet", data)
    except CodecError as exc:
        assert str(exc).startswith("cannot decode Tweet: ")


def test_corrupt_string_is_reported() -> None:
    data = _tweet_bytes()[:10] + b"\x04\xff\xfe"
    with pytest.raises(CodecError, match="corrupt body: UnicodeDecodeError"):
        Codec().decode("Tweet", data)


def test_bytes_of_another_record_are_refused() -> None:
    data = Codec().encode("ShedRecord", VALUES["ShedRecord"])
    with pytest.raises(CodecError, match="cannot decode Tweet: the bytes hold a ShedRecord"):
        Codec().decode("Tweet", data)


def test_unknown_schema_id_from_registry(schema_registry: FakeSchemaRegistry) -> None:
    with pytest.raises(CodecError) as info:
        codec = Codec(registry_url=schema_registry.url)
        codec.decode("Tweet", b"\x00\x00\x00\x00\x63\x02a")
    assert str(info.value) == (
        f"cannot decode Tweet: schema id 99: schema registry {schema_registry.url} answered "
        "404: Schema 99 not found (error code 40403)"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x01", "Expecting data framing of length 6 bytes or more"),
        (b"\x01" + bytes(10), "cannot decode Tweet: "),
    ],
)
def test_garbage_through_the_registry(
    data: bytes, message: str, schema_registry: FakeSchemaRegistry
) -> None:
    with pytest.raises(CodecError, match=message) as info:
        Codec(registry_url=schema_registry.url).decode("Tweet", data)
    assert str(info.value).startswith("cannot decode Tweet: ")


def test_registry_bytes_of_another_record_are_refused(schema_registry: FakeSchemaRegistry) -> None:
    codec = Codec(registry_url=schema_registry.url)
    data = codec.encode("ShedRecord", VALUES["ShedRecord"], topic="tweets.shed")
    with pytest.raises(CodecError, match="cannot decode Tweet: the bytes hold a ShedRecord"):
        codec.decode("Tweet", data)


def test_registry_bytes_with_leftovers_are_refused(schema_registry: FakeSchemaRegistry) -> None:
    codec = Codec(registry_url=schema_registry.url)
    data = codec.encode("Tweet", VALUES["Tweet"], topic="tweets")
    with pytest.raises(CodecError, match="cannot decode Tweet: 2 bytes left after the body"):
        codec.decode("Tweet", data + b"\x00\x00")
    with pytest.raises(CodecError, match="cannot decode Tweet: body truncated"):
        codec.decode("Tweet", data[:-3])


def test_unknown_record_name() -> None:
    with pytest.raises(CodecError, match="unknown record; known: CapacityReport"):
        Codec().decode("Tweeet", b"\xc3\x01")


def test_not_bytes() -> None:
    with pytest.raises(CodecError, match="expected bytes, got str"):
        Codec().decode("Tweet", "c3 01")  # type: ignore[arg-type]


# Values that do not fit --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "change", "message"),
    [
        ("Tweet", {"id": 1790000000000000001}, "field tagstream.Tweet.id: got 1790000000000000001"),
        ("Tweet", {"author_id": 5}, "tagstream.Tweet.author_id: got 5, expected null or string"),
        ("Tweet", {"media": [{"type": "photo"}]}, "field tagstream.Media.media_key: got None"),
        ("ImageEvent", {"image": "not bytes"}, "field tagstream.ImageEvent.image"),
        ("CapacityReport", {"queue_depth": None}, "field tagstream.CapacityReport.queue_depth"),
        ("HashtagResult", {"scores": {"cat": "high"}}, "HashtagResult"),
    ],
)
def test_misfit_value_raises_codec_error(record: str, change: dict[str, Any], message: str) -> None:
    with pytest.raises(CodecError, match=message) as info:
        Codec().encode(record, {**VALUES[record], **change})
    assert str(info.value).startswith(f"cannot encode {record}: ")


def test_missing_required_field() -> None:
    value = dict(VALUES["Tweet"])
    del value["text"]
    with pytest.raises(CodecError, match="cannot encode Tweet: field tagstream.Tweet.text"):
        Codec().encode("Tweet", value)


def test_not_a_mapping() -> None:
    with pytest.raises(CodecError, match="cannot encode Tweet: expected a mapping, got list"):
        Codec().encode("Tweet", [1, 2])  # type: ignore[arg-type]


# Registry failures -----------------------------------------------------------------------


def test_unreachable_registry_hides_credentials() -> None:
    codec = Codec(
        registry_url=f"http://me:hunter2@127.0.0.1:{_closed_port()}/",
        timeout_s=2,
        registry_config={"max.retries": 0},
    )
    with pytest.raises(RegistryUnavailableError, match="schema registry http://127.0.0.1:") as info:
        codec.encode("Tweet", VALUES["Tweet"], topic="tweets")
    assert "hunter2" not in str(info.value) and "me:" not in str(info.value)


def test_registry_refusal_is_explained(schema_registry: FakeSchemaRegistry) -> None:
    # An earlier Tweet on the subject whose `text` was an int: ours cannot follow it.
    earlier = _shipped("Tweet")
    next(f for f in earlier["fields"] if f["name"] == "text")["type"] = "int"
    client = SchemaRegistryClient({"url": schema_registry.url})
    AvroSerializer(client, json.dumps(earlier))(
        {**VALUES["Tweet"], "text": 1}, SerializationContext("tweets", MessageField.VALUE)
    )
    with pytest.raises(CodecError) as info:
        Codec(registry_url=schema_registry.url).encode("Tweet", VALUES["Tweet"], topic="tweets")
    assert str(info.value).startswith(
        f"cannot encode Tweet (subject tweets-value): schema registry {schema_registry.url} "
        "answered 409: Schema being registered is incompatible with an earlier schema"
    )


def test_bad_registry_url() -> None:
    with pytest.raises(CodecError, match="must be http"):
        Codec(registry_url="localhost:8081")


def test_a_registry_that_does_not_answer_is_not_a_bad_record(
    schema_registry: FakeSchemaRegistry,
) -> None:
    """Refused connections and 5xx/429 answers raise RegistryUnavailableError, never the
    CodecError that would make a good record a dead letter; once the registry is back the
    same codec works. A refusal (an unknown schema id: 404) stays a CodecError."""
    tweet, shed = VALUES["Tweet"], VALUES["ShedRecord"]
    data = Codec(registry_url=schema_registry.url).encode("Tweet", tweet, topic="tweets")
    nobody = Codec(
        registry_url=f"http://127.0.0.1:{_closed_port()}", registry_config={"max.retries": 0}
    )
    with pytest.raises(RegistryUnavailableError, match="Connection refused"):
        nobody.encode("Tweet", tweet, topic="tweets")
    with pytest.raises(RegistryUnavailableError, match="cannot decode Tweet: schema id 1"):
        nobody.decode("Tweet", data)

    fresh = Codec(registry_url=schema_registry.url, registry_config={"max.retries": 0})
    for status in (503, 429, 500):
        schema_registry.down_with = status
        with pytest.raises(RegistryUnavailableError, match=f"answered {status}") as info:
            fresh.decode("Tweet", data)
        assert not isinstance(info.value, CodecError)
        with pytest.raises(RegistryUnavailableError, match=f"answered {status}"):
            fresh.encode("ShedRecord", shed, topic="tweets.shed")
    schema_registry.down_with = None
    assert fresh.decode("Tweet", data)["id"] == tweet["id"]
    assert fresh.decode("ShedRecord", fresh.encode("ShedRecord", shed, topic="tweets.shed"))

    unknown = b"\x00" + (999).to_bytes(4, "big") + b"\x02"
    with pytest.raises(CodecError, match="answered 404"):
        fresh.decode("Tweet", unknown)
