"""examples/records.py, the copyable decoders: Apache avro for single-object, stock serdes."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.records import SingleObjectReader, UndecodableError, reader
from schemas.codec import Codec
from tests.registry import FakeSchemaRegistry
from tests.samples import TOPICS, VALUES

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize("record", sorted(VALUES))
def test_apache_avro_reads_our_single_object_bytes(record: str) -> None:
    assert SingleObjectReader(SCHEMAS)(Codec().encode(record, VALUES[record])) == VALUES[record]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"id": 1}', "not an Avro single-object message"),
        (b"\xc3\x01" + bytes(8) + b"\x02a", "unknown schema fingerprint 0000000000000000"),
        (Codec().encode("CapacityReport", VALUES["CapacityReport"]) + b"\x00", "1 bytes left"),
    ],
)
def test_single_object_garbage_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(UndecodableError, match=message):
        SingleObjectReader(SCHEMAS)(data)


def test_one_reader_for_both_framings(schema_registry: FakeSchemaRegistry) -> None:
    read = reader(schema_dir=SCHEMAS, registry_url=schema_registry.url)
    registry_codec = Codec(registry_url=schema_registry.url)
    for record, value in VALUES.items():
        topic = TOPICS[record]
        assert read(Codec().encode(record, value), topic) == value
        assert read(registry_codec.encode(record, value, topic=topic), topic) == value
    with pytest.raises(UndecodableError, match="no reader for a message that starts 00"):
        reader(schema_dir=SCHEMAS)(registry_codec.encode("Tweet", VALUES["Tweet"]), "tweets")
