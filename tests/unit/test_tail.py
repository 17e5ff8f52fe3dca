"""infra/tail.py without a broker: how a record is shown, times, topic names."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from infra.exceptions import ConfigurationError
from infra.settings import Settings
from infra.tail import TailLine, parse_time, resolve_topic, shown
from tests.samples import VALUES


def test_bytes_fields_are_shown_as_sizes_at_any_depth() -> None:
    value = {**VALUES["ImageEvent"], "nested": [{"blob": b"\x00" * 5}], "none": None}
    out = shown(value)
    assert out["image"] == f"<{len(VALUES['ImageEvent']['image'])} bytes>"
    assert out["nested"] == [{"blob": "<5 bytes>"}]
    assert out["none"] is None and out["timestamps"] == VALUES["ImageEvent"]["timestamps"]
    json.dumps(out)  # nothing left that JSON cannot hold


def test_a_line_in_both_forms() -> None:
    line = TailLine("t-hashtags", 1, 42, 1715623451123, "179", value={"a": "é"})
    assert line.render(as_json=False) == '1@42 2024-05-13T18:04:11.123Z key=179 {"a": "é"}'
    assert json.loads(line.render(as_json=True)) == {
        "topic": "t-hashtags",
        "partition": 1,
        "offset": 42,
        "timestamp": "2024-05-13T18:04:11.123Z",
        "key": "179",
        "value": {"a": "é"},
    }


def test_an_undecodable_record_is_a_line_with_its_error() -> None:
    line = TailLine("t", 0, 7, None, None, error="cannot decode Tweet: empty input", size=0)
    assert (
        line.render(as_json=False)
        == "0@7 - key=None error: cannot decode Tweet: empty input (0 bytes)"
    )
    assert json.loads(line.render(as_json=True))["error"].startswith("cannot decode Tweet")


def test_times_are_iso_8601_and_utc_unless_zoned() -> None:
    assert parse_time("2024-05-13T18:04:11") == datetime(2024, 5, 13, 18, 4, 11, tzinfo=UTC)
    assert (
        parse_time("2024-05-13T20:04:11+02:00").timestamp()
        == datetime(2024, 5, 13, 18, 4, 11, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ConfigurationError, match="'yesterday' is not an ISO 8601 time"):
        parse_time("yesterday")


def test_topics_by_short_or_full_name() -> None:
    settings = Settings(topic_prefix="p-")
    assert resolve_topic(settings, "tweets.shed") == "tweets.shed"
    assert resolve_topic(settings, "p-hashtags") == "hashtags"
    with pytest.raises(ConfigurationError, match="unknown topic 'hashtag'; tagstream topics: "):
        resolve_topic(settings, "hashtag")
