"""The source seam's pump (no broker): skips, repeats by id/operation/revision, deletions
counted apart, archive lines tagged with the source's format, resume positions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from infra.record_producer import SourceRef
from producers.archive import StreamArchive, read_archive
from producers.source import PositionFile, Rejected, SourceItem, TweetSource, pump
from schemas.records import deletion, media, tweet
from tests.helpers import MetricDeltas, RecordingProducer


def post(n: int, *, operation: str = "create", revision: str | None = None) -> Any:
    return tweet(
        id=f"net:{n}",
        text=f"post {n}",
        source="fake",
        ingested_at_ms=0,
        network="fake",
        media=[media(media_key=f"net:{n}#0", type="photo", url=f"http://h/{n}.jpg")],
        operation=operation,
        revision=revision,
    )


class ListSource(TweetSource):
    name = "fake"
    dead_letter_stage = "fake"
    repeats = 100
    archive_format = "fake"

    def __init__(self, items: list[SourceItem]) -> None:
        self._items = items
        self.resumed: Any = None

    def start_after(self, position: Any) -> None:
        self.resumed = position

    async def items(self) -> AsyncIterator[SourceItem]:
        for item in self._items:
            yield item


def test_a_source_item_holds_exactly_one_thing() -> None:
    with pytest.raises(ValueError):
        SourceItem()
    with pytest.raises(ValueError):
        SourceItem(tweet=post(1), skipped="no_image")
    assert SourceItem(skipped="no_image", position=3).position == 3


def test_skips_repeats_operations_and_archive_format(tmp_path: Path) -> None:
    gone = deletion(id="net:1", network="fake", source="fake", ingested_at_ms=0, revision="r3")
    items = [
        SourceItem(tweet=post(1, revision="r1"), position=1, raw={"n": 1}),
        SourceItem(skipped="no_image", position=2),
        SourceItem(tweet=post(1, revision="r1"), position=3, raw={"n": 1}),  # a repeat
        SourceItem(tweet=post(1, operation="update", revision="r2"), position=4, raw={"n": 2}),
        SourceItem(tweet=gone, position=5, raw={"n": 3}),
        SourceItem(rejected=Rejected(b"{bad", "not JSON", SourceRef("fake")), raw=b"{bad"),
        SourceItem(skipped="other_collection", position=6),
    ]
    producer = RecordingProducer()
    positions = PositionFile(tmp_path / "state.json")
    moved = MetricDeltas()
    with StreamArchive(tmp_path / "archive") as archive:
        counts = asyncio.run(
            pump(ListSource(items), producer, archive=archive, positions=positions)  # type: ignore[arg-type]
        )
    assert counts["tweets"] == 1 and counts["updates"] == 1 and counts["deletes"] == 1
    assert counts["duplicates"] == 1 and counts["dead_letters"] == 1
    assert counts["skipped"] == 2
    assert counts["skipped_no_image"] == 1 and counts["skipped_other_collection"] == 1
    # The same counts as metrics, by source (and operation, reason, stage).
    fake = {"source": "fake"}
    assert moved.delta("tagstream_source_items_read_total", **fake) == len(items)
    for operation in ("create", "update", "delete"):
        produced = "tagstream_source_tweets_produced_total"
        assert moved.delta(produced, **fake, operation=operation) == 1, operation
    assert moved.delta("tagstream_source_duplicates_total", **fake) == 1
    assert moved.delta("tagstream_source_skipped_total", **fake, reason="no_image") == 1
    assert moved.delta("tagstream_dead_letters_total", stage="fake", cause="CodecError") == 1
    sent = producer.of("tweets")
    assert [(t["id"], t["operation"]) for t in sent] == [
        ("net:1", "create"),
        ("net:1", "update"),
        ("net:1", "delete"),
    ]
    assert all(key == "net:1" for topic, key, _ in producer.sent if topic == "tweets")
    # Skips are not archived; every line says whose format it is.
    back = list(read_archive(tmp_path / "archive"))
    assert [(a.line, a.line_format) for a in back] == [
        ({"n": 1}, "fake"),
        ({"n": 1}, "fake"),
        ({"n": 2}, "fake"),
        ({"n": 3}, "fake"),
        (b"{bad", "fake"),
    ]
    # The position passed the skips too, and a restart starts after it.
    assert positions.load() == 6
    again = ListSource([])
    asyncio.run(pump(again, RecordingProducer(), positions=positions))  # type: ignore[arg-type]
    assert again.resumed == 6
