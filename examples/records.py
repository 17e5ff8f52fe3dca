"""Decode tagstream's records with other people's code only: copy this file into your service.

tagstream writes Avro in one of two framings (docs/consumers.md):

* Avro single-object encoding (the default): ``C3 01``, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema, the Avro body. `SingleObjectReader`
  reads it with the Apache ``avro`` package and the ``.avsc`` files alone: it maps each
  file's fingerprint to its schema, and reads every record with the *current* schema of
  its name as reader schema, so data written by an older release (whose schemas you keep,
  as tagstream does under ``schemas/history/``) comes out in today's shape, defaults
  filled in.
* the Confluent wire format (with a schema registry): ``00``, the 4-byte schema id, the
  body. `registry_reader` is confluent-kafka's stock `AvroDeserializer` on a
  `SchemaRegistryClient`, nothing more.

`reader` picks by the first bytes, so one function reads a topic in either framing.
Needs ``confluent-kafka[avro]`` (it brings ``avro`` and the registry client).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = (0, 1)  # 1: Confluent's newer framing, a schema GUID instead of the id

#: Decodes one message value of a topic: ``read(value_bytes, topic) -> dict``.
Reader = Callable[[bytes, str], dict[str, Any]]


class UndecodableError(ValueError):
    """A message that is not a record this reader knows."""


class SingleObjectReader:
    """Avro single-object messages, read with the Apache ``avro`` package.

    ``schema_dir`` holds the current ``*.avsc`` files; any ``*.avsc`` below it (such as
    ``history/<version>/``) is known as a writer schema too.
    """

    def __init__(self, schema_dir: Path) -> None:
        self.current: dict[str, avro.schema.Schema] = {}
        self.writers: dict[bytes, avro.schema.Schema] = {}
        for path in sorted(Path(schema_dir).rglob("*.avsc")):
            schema = avro.schema.parse(path.read_text(encoding="utf-8"))
            self.writers.setdefault(schema.fingerprint("CRC-64-AVRO"), schema)
            if path.parent == Path(schema_dir):
                self.current[schema.fullname] = schema
        # The current schemas win over an older file with the same fingerprint.
        for schema in self.current.values():
            self.writers[schema.fingerprint("CRC-64-AVRO")] = schema

    def __call__(self, data: bytes, topic: str = "") -> dict[str, Any]:
        if data[:2] != SINGLE_OBJECT_MARKER or len(data) < 10:
            raise UndecodableError(f"not an Avro single-object message: {data[:10].hex(' ')}")
        writer = self.writers.get(bytes(data[2:10]))
        if writer is None:
            raise UndecodableError(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
        reader = self.current.get(writer.fullname, writer)
        body = io.BytesIO(data[10:])
        value = avro.io.DatumReader(writer, reader).read(avro.io.BinaryDecoder(body))
        if body.tell() != len(data) - 10:
            raise UndecodableError(f"{len(data) - 10 - body.tell()} bytes left after the body")
        return value


def registry_reader(url: str, *, reader_schema: str | None = None) -> Reader:
    """confluent-kafka's stock `AvroDeserializer` on the registry at ``url``: the writer
    schema comes from the registry by the message's schema id. Records come out in the
    writer's shape, or, given ``reader_schema`` (an ``.avsc`` text), in that one's, with
    its defaults for the fields an older writer did not have."""
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": url}), reader_schema)

    def read(data: bytes, topic: str) -> dict[str, Any]:
        return deserializer(data, SerializationContext(topic, MessageField.VALUE))

    return read


def reader(*, schema_dir: Path | None = None, registry_url: str | None = None) -> Reader:
    """One reader for both framings: single-object needs ``schema_dir``, the Confluent
    wire format ``registry_url``."""
    single = SingleObjectReader(schema_dir) if schema_dir is not None else None
    confluent = registry_reader(registry_url) if registry_url else None

    def read(data: bytes, topic: str) -> dict[str, Any]:
        if data[:2] == SINGLE_OBJECT_MARKER and single is not None:
            return single(data, topic)
        if data[:1] and data[0] in CONFLUENT_MAGIC and confluent is not None:
            return confluent(data, topic)
        raise UndecodableError(f"no reader for a message that starts {data[:4].hex(' ')}")

    return read
