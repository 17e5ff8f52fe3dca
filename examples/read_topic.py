"""Print tagstream topics as JSON lines, decoded with other people's code only.

    python -m examples.read_topic --bootstrap localhost:9092 --schemas schemas hashtags
    python -m examples.read_topic --bootstrap kafka:9092 --registry http://registry:8081 hashtags

Reads every partition of each topic from its beginning to its end (where a fetch says the
end is) without joining a consumer group, so it commits nothing and disturbs no one, then
exits. Each record is one line: ``{"topic", "partition", "offset", "key", "value"}``,
bytes fields as base64; a record it cannot decode is a line with ``"error"`` instead of
``"value"``. Decoding is `records.reader`: Apache ``avro`` with the ``.avsc`` files for
single-object messages, confluent-kafka's stock `AvroDeserializer` for registry ones.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from examples.records import Reader, reader


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def read_topics(
    bootstrap: str,
    topics: list[str],
    read: Reader,
    *,
    limit: int | None = None,
    idle_timeout_s: float = 10.0,
) -> Iterator[dict[str, Any]]:
    """Every record of ``topics`` from the beginning to the end, as line dicts."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-topic-{uuid.uuid4().hex[:8]}",  # required, never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        wanted: list[TopicPartition] = []
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is None or metadata.error is not None:
                raise SystemExit(f"error: topic {topic!r} does not exist")
            wanted += [TopicPartition(topic, p, 0) for p in sorted(metadata.partitions)]
        # offset 0 may be gone (retention): ask for the beginning of each partition
        consumer.assign([TopicPartition(tp.topic, tp.partition, -2) for tp in wanted])
        open_parts = {(tp.topic, tp.partition) for tp in wanted}
        count = 0
        last = time.monotonic()
        while open_parts and (limit is None or count < limit):
            message = consumer.poll(0.5)
            if message is None:
                if time.monotonic() - last > idle_timeout_s:
                    raise SystemExit(f"error: no end reached in {idle_timeout_s:g} s")
                continue
            last = time.monotonic()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard((message.topic(), message.partition()))
                    continue
                raise SystemExit(f"error: {error}")
            line: dict[str, Any] = {
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "key": message.key().decode("utf-8", "replace") if message.key() else None,
            }
            try:
                line["value"] = _jsonable(read(message.value() or b"", message.topic()))
            except Exception as exc:  # a record we cannot decode is reported, not fatal
                line["error"] = f"{type(exc).__name__}: {exc}"
            count += 1
            yield line
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("topics", nargs="+", help="full topic names")
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--schemas", type=Path, help="folder of the .avsc files (single-object)")
    parser.add_argument("--registry", help="schema registry URL (Confluent wire format)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many records")
    args = parser.parse_args(argv)
    if args.schemas is None and args.registry is None:
        parser.error("give --schemas, --registry or both")
    read = reader(schema_dir=args.schemas, registry_url=args.registry)
    for line in read_topics(args.bootstrap, args.topics, read, limit=args.limit):
        print(json.dumps(line, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
