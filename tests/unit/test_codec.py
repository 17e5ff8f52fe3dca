"""Tests of schemas.codec: both wire formats, schema evolution, and every way to fail."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastavro
import pytest

from infra.exceptions import CodecError
from schemas import RECORD_NAMES, Codec

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

# One realistic value per record, every field given, so a round trip must return it as is.
# Floats of HashtagResult.scores are Avro "float": values exact in 32 bits.
VALUES: dict[str, dict[str, Any]] = {
    "Tweet": {
        "id": "1790000000000000001",
        "text": "Sunset over the harbour 🌅 #photography",
        "author_id": "2244994945",
        "created_at": "2024-05-13T18:04:11.000Z",
        "media": [
            {
                "media_key": "3_1790000000000000001",
                "type": "photo",
                "url": "https://pbs.twimg.com/media/GNa1.jpg",
                "preview_image_url": None,
                "width": 1200,
                "height": 800,
                "alt_text": "orange sky over boats",
            },
            {
                "media_key": "7_1790000000000000002",
                "type": "video",
                "url": None,
                "preview_image_url": "https://pbs.twimg.com/ext_tw_video_thumb/2.jpg",
                "width": None,
                "height": None,
                "alt_text": None,
            },
        ],
        "matching_rules": [
            {"id": "1650000000000000000", "tag": "photos"},
            {"id": "9", "tag": None},
        ],
        "source": "twitter",
        "ingested_at_ms": 1715623451123.5,
        "replay_run_id": None,
        "network": "x",
        "post_id": "1790000000000000001",
        "post_url": "https://x.com/i/web/status/1790000000000000001",
        "langs": ["en"],
        "tags": ["photography"],
        "operation": "create",
        "revision": None,
    },
    "ImageEvent": {
        "tweet_id": "1790000000000000001",
        "media_key": "3_1790000000000000001",
        "url": "https://pbs.twimg.com/media/GNa1.jpg",
        "position": 0,
        "tweet_text": "Sunset over the harbour",
        "matching_rules": ["photos"],
        "content_type": "image/jpeg",
        "image": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) + b"\xff\xd9",
        "source": "replay",
        "replay_run_id": "run-2024-05-13",
        "timestamps": {"ingested": 1715623451123.5, "admitted": 1715623451124.0},
    },
    "HashtagResult": {
        "tweet_id": "1790000000000000001",
        "media_key": "3_1790000000000000001",
        "url": "https://pbs.twimg.com/media/GNa1.jpg",
        "tweet_text": "Sunset over the harbour",
        "hashtags": ["#sunset", "#harbour", "#boats"],
        "top_class": "seashore",
        "scores": {"seashore": 0.75, "boathouse": 0.125, "lakeside": 0.0625},
        "model_id": "mobilenet_v3_small",
        "model_version": "2024.05.1",
        "consumer_id": "gpu-host-4242",
        "source": "twitter",
        "replay_run_id": None,
        "thumbnail": b"\xff\xd8\xff\xdbthumb\xff\xd9",
        "timestamps": {"ingested": 1715623451123.5, "inferred": 1715623451301.25},
        "retraction": False,
    },
    "ShedRecord": {
        "tweet_id": "1790000000000000003",
        "reason": "over_rate",
        "detail": "bucket empty",
        "media_keys": ["3_1790000000000000003", "3_1790000000000000004"],
        "admission_rate": 50.0,
        "observed_rate": 212.5,
        "tokens": 0.25,
        "source": "synthetic",
        "replay_run_id": None,
        "shed_at_ms": 1715623451400.0,
    },
    "DeadLetter": {
        "source_topic": "tweets",
        "source_partition": 3,
        "source_offset": 123456789012,
        "stage": "decode_tweet",
        "error_class": "CodecError",
        "message": "cannot decode Tweet: empty input",
        "tweet_id": None,
        "media_key": None,
        "url": None,
        "payload": b"\x00\x01garbage",
        "failed_at_ms": 1715623451500.0,
    },
    "CapacityReport": {
        "consumer_id": "gpu-host-4242",
        "images_per_s": 812.5,
        "batch_size": 27.75,
        "queue_depth": 1500,
        "reported_at_ms": 1715623452000.0,
    },
}

TOPICS = {
    "Tweet": "tweets",
    "ImageEvent": "images",
    "HashtagResult": "hashtags",
    "ShedRecord": "tweets.shed",
    "DeadLetter": "deadletter",
    "CapacityReport": "capacity",
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


# A tiny schema registry -----------------------------------------------------------------


class FakeRegistry:
    """The two endpoints of a Confluent schema registry the codec uses, in memory."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}  # schema text -> id, shared by subjects as upstream
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.refuse_subjects: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep pytest output clean

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:  # noqa: N802
                registry.requests.append(("POST", self.path, dict(self.headers)))
                parts = self.path.split("/")
                if len(parts) != 4 or parts[1] != "subjects" or parts[3] != "versions":
                    return self._answer(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                subject = parts[2]
                if subject in registry.refuse_subjects:
                    return self._answer(
                        409,
                        {"error_code": 409, "message": "Schema being registered is incompatible"},
                    )
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["schema"]
                fastavro.parse_schema(json.loads(text))  # a real registry rejects bad schemas
                with registry.lock:
                    schema_id = registry.ids.setdefault(text, len(registry.ids) + 1)
                    registry.schemas[schema_id] = text
                    versions = registry.subjects.setdefault(subject, [])
                    if schema_id not in versions:
                        versions.append(schema_id)
                return self._answer(200, {"id": schema_id})

            def do_GET(self) -> None:  # noqa: N802
                registry.requests.append(("GET", self.path, dict(self.headers)))
                parts = self.path.split("/")
                if len(parts) == 4 and parts[1:3] == ["schemas", "ids"] and parts[3].isdigit():
                    text = registry.schemas.get(int(parts[3]))
                    if text is not None:
                        return self._answer(200, {"schema": text})
                return self._answer(404, {"error_code": 40403, "message": "Schema not found"})

        return Handler


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # the fake is local: never through a proxy
    fake = FakeRegistry()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join(timeout=5)


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
def test_registry_round_trip(record: str, registry: FakeRegistry) -> None:
    writer = Codec(registry_url=registry.url)
    data = writer.encode(record, VALUES[record], topic=TOPICS[record])
    assert data[:1] == b"\x00"
    schema_id = struct.unpack(">I", data[1:5])[0]
    assert registry.subjects[f"{TOPICS[record]}-value"] == [schema_id]
    assert json.loads(registry.schemas[schema_id]) == _shipped(record)
    assert writer.decode(record, data) == VALUES[record]
    # A fresh process knows no id: it fetches the writer schema once.
    reader = Codec(registry_url=registry.url)
    assert reader.decode(record, data) == VALUES[record]
    assert reader.decode(record, data) == VALUES[record]
    gets = [path for method, path, _ in registry.requests if method == "GET"]
    assert gets == [f"/schemas/ids/{schema_id}"]


def test_registry_caches_ids_and_uses_record_name_without_topic(registry: FakeRegistry) -> None:
    codec = Codec(registry_url=registry.url)
    first = codec.encode("Tweet", VALUES["Tweet"])
    second = codec.encode("Tweet", VALUES["Tweet"])
    assert first[:5] == second[:5]
    assert list(registry.subjects) == ["tagstream.Tweet"]
    posts = [r for r in registry.requests if r[0] == "POST"]
    assert len(posts) == 1
    headers = {k.lower(): v for k, v in posts[0][2].items()}
    assert headers["content-type"] == "application/vnd.schemaregistry.v1+json"
    assert "authorization" not in headers


def test_registry_credentials_go_in_a_header(registry: FakeRegistry) -> None:
    url = registry.url.replace("http://", "http://svc%40team:s3cret@")
    codec = Codec(registry_url=url)
    codec.encode("CapacityReport", VALUES["CapacityReport"], topic="capacity")
    headers = {k.lower(): v for k, v in registry.requests[-1][2].items()}
    assert headers["authorization"] == "Basic " + base64.b64encode(b"svc@team:s3cret").decode()
    assert "s3cret" not in repr(codec)


def test_registry_codec_reads_single_object_bytes(registry: FakeRegistry) -> None:
    data = Codec().encode("ShedRecord", VALUES["ShedRecord"])
    assert Codec(registry_url=registry.url).decode("ShedRecord", data) == VALUES["ShedRecord"]


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


def test_newer_reader_through_the_registry(registry: FakeRegistry) -> None:
    old_bytes = Codec(registry_url=registry.url).encode("Tweet", VALUES["Tweet"], topic="tweets")
    newer = Codec(registry_url=registry.url, reader_schemas=[_tweet_v2()])
    assert newer.decode("Tweet", old_bytes) == {**VALUES["Tweet"], "lang": "und"}


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


#: The Tweet fields added for the open networks, as an older writer's records read.
TWEET_DEFAULTS = {
    "network": "x",
    "post_id": None,
    "post_url": None,
    "langs": [],
    "tags": [],
    "operation": "create",
    "revision": None,
}


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


def test_unknown_schema_id_from_registry(registry: FakeRegistry) -> None:
    with pytest.raises(CodecError, match="schema id 99|ids/99") as info:
        Codec(registry_url=registry.url).decode("Tweet", b"\x00\x00\x00\x00\x63\x02a")
    assert "answered 404: Schema not found (error code 40403)" in str(info.value)
    assert str(info.value).startswith("cannot decode Tweet: ")


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
    codec = Codec(registry_url=f"http://me:hunter2@127.0.0.1:{_closed_port()}/", timeout_s=2)
    with pytest.raises(CodecError, match="schema registry http://127.0.0.1:") as info:
        codec.encode("Tweet", VALUES["Tweet"], topic="tweets")
    assert "hunter2" not in str(info.value) and "me:" not in str(info.value)


def test_registry_refusal_is_explained(registry: FakeRegistry) -> None:
    registry.refuse_subjects.add("tweets-value")
    with pytest.raises(CodecError, match="answered 409: Schema being registered is incompatible"):
        Codec(registry_url=registry.url).encode("Tweet", VALUES["Tweet"], topic="tweets")


def test_bad_registry_url() -> None:
    with pytest.raises(CodecError, match="must be http"):
        Codec(registry_url="localhost:8081")
