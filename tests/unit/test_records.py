"""Each typed record matches its .avsc, and every builder's output encodes."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

import pytest

from schemas import records
from schemas.codec import RECORD_NAMES, Codec

SCHEMAS = Path(records.__file__).parent

_PRIMITIVES = {
    "string": str,
    "double": float,
    "float": float,
    "int": int,
    "long": int,
    "bytes": bytes,
    "boolean": bool,
}


def avro_type_matches(avro: object, hint: object, where: str) -> None:
    """Assert that Python type `hint` is what the Avro type `avro` reads as."""
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        assert "null" in avro and len(branches) == 1, f"{where}: only [null, X] unions are used"
        assert isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint), (
            f"{where}: the schema allows null, the record type {hint} does not"
        )
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        avro_type_matches(branches[0], inner, where)
        return
    assert not (isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)), (
        f"{where}: the record type {hint} allows None, the schema does not"
    )
    if isinstance(avro, str):
        assert hint is _PRIMITIVES[avro], f"{where}: schema {avro}, record {hint}"
        return
    assert isinstance(avro, dict)
    kind = avro["type"]
    if kind == "array":
        assert typing.get_origin(hint) is list, f"{where}: schema array, record {hint}"
        avro_type_matches(avro["items"], typing.get_args(hint)[0], f"{where}[]")
    elif kind == "map":
        assert typing.get_origin(hint) is dict, f"{where}: schema map, record {hint}"
        key, value = typing.get_args(hint)
        assert key is str
        avro_type_matches(avro["values"], value, f"{where}{{}}")
    elif kind == "record":
        record_matches(avro, hint, where)
    else:
        avro_type_matches(kind, hint, where)


def record_matches(schema: dict, typed: object, where: str) -> None:
    hints = typing.get_type_hints(typed)
    fields = [f["name"] for f in schema["fields"]]
    assert list(hints) == fields, f"{where}: fields {list(hints)} != schema {fields}"
    for field in schema["fields"]:
        avro_type_matches(field["type"], hints[field["name"]], f"{where}.{field['name']}")


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_typed_record_matches_its_schema(name: str) -> None:
    schema = json.loads((SCHEMAS / f"{name}.avsc").read_text())
    record_matches(schema, records.RECORD_TYPES[name], name)


def test_a_disagreement_is_caught() -> None:
    schema = json.loads((SCHEMAS / "CapacityReport.avsc").read_text())
    schema["fields"][1]["type"] = ["null", "double"]
    with pytest.raises(AssertionError, match="allows null"):
        record_matches(schema, records.CapacityReport, "CapacityReport")
    schema["fields"].append({"name": "extra", "type": "string"})
    with pytest.raises(AssertionError, match="fields"):
        record_matches(schema, records.CapacityReport, "CapacityReport")


def test_every_record_has_a_typed_definition() -> None:
    assert set(records.RECORD_TYPES) == set(RECORD_NAMES)


def test_builders_make_records_the_codec_writes_and_reads_back() -> None:
    codec = Codec()
    photo = records.media(media_key="3_1", type="photo", url="http://h/a.jpg")
    tweet = records.tweet(
        id="1",
        text="a cat",
        source="test",
        ingested_at_ms=1.0,
        media=[photo, records.media(media_key="7_1", type="video")],
        matching_rules=[{"id": "9", "tag": "cats"}, {"id": "10", "tag": None}],
    )
    assert records.photos(tweet) == [photo] and records.rule_tags(tweet) == ["cats", "10"]
    event = records.image_event(
        tweet=tweet,
        photo=photo,
        position=0,
        content_type="image/jpeg",
        image=b"\xff\xd8",
        timestamps={"ingested": 1.0},
    )
    result = records.hashtag_result(
        event=event,
        hashtags=["#cats"],
        top_class="cats",
        scores={"cats": 0.5},  # Avro float: exact in 32 bits,
        model_id="m",
        model_version="1",
        provider="tensorrt",
        precision="int8",
        timestamps={"produced": 2.0},
    )
    assert result["timestamps"] == {"ingested": 1.0, "produced": 2.0}
    assert (result["provider"], result["precision"]) == ("tensorrt", "int8")
    shed = records.shed_record(
        tweet=tweet, reason="no_photo", admission_rate=1, observed_rate=2, tokens=0
    )
    letter = records.dead_letter(
        source_topic="t", source_partition=0, source_offset=1, stage="s", error=ValueError("x")
    )
    report = records.capacity_report(consumer_id="c", images_per_s=1.5, batch_size=8, queue_depth=3)
    built = {
        "Tweet": tweet,
        "ImageEvent": event,
        "HashtagResult": result,
        "ShedRecord": shed,
        "DeadLetter": letter,
        "CapacityReport": report,
    }
    for name, value in built.items():
        assert codec.decode(name, codec.encode(name, value)) == value, name


def test_deletions_and_retractions_encode_and_a_retraction_withdraws_only_earlier_results() -> None:
    codec = Codec()
    gone = records.deletion(
        id="at://did:plc:a/app.bsky.feed.post/1", network="bluesky", source="bluesky",
        ingested_at_ms=5.0, revision="r2",
    )  # fmt: skip
    assert gone["operation"] == "delete" and gone["text"] == "" and gone["media"] == []
    assert codec.decode("Tweet", codec.encode("Tweet", gone)) == gone
    withdrawal = records.retraction(tweet=gone, timestamps={"received": 6.0})
    assert withdrawal["timestamps"] == {"ingested": 5.0, "received": 6.0}
    assert codec.decode("HashtagResult", codec.encode("HashtagResult", withdrawal)) == withdrawal
    earlier = {"tweet_id": gone["id"], "timestamps": {"ingested": 4.0}, "retraction": False}
    assert records.retracts(withdrawal, earlier)
    assert not records.retracts(withdrawal, {**earlier, "timestamps": {"ingested": 5.0}})
    assert not records.retracts(withdrawal, {**earlier, "tweet_id": "other"})
    assert not records.retracts(earlier, earlier)  # a result withdraws nothing
    with pytest.raises(ValueError, match="operation"):
        records.tweet(id="1", text="", source="t", ingested_at_ms=0, operation="edit")
