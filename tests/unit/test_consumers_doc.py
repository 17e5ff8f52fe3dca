"""docs/consumers.md stays true: its topic and field tables match the code and the .avsc
files, and its snippets run (the registry one against the broker, in tests/integration)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings
from infra.topics import TOPIC_RECORDS, topic_specs
from schemas.codec import RECORD_NAMES, Codec
from tests.helpers import doc_snippets
from tests.samples import VALUES

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "consumers.md").read_text(encoding="utf-8")


def snippets() -> dict[str, dict[str, Any]]:
    return doc_snippets(REPO / "docs" / "consumers.md")


def _rows(section: str) -> dict[str, list[str]]:
    return {
        cells[0].strip("`"): cells[1:]
        for line in section.splitlines()
        if line.startswith("| `")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }


def _section(title_start: str) -> str:
    match = re.search(rf"^### {re.escape(title_start)}.*?(?=^##)", DOC, flags=re.S | re.M)
    assert match, f"docs/consumers.md has no section '### {title_start}'"
    return match.group(0)


def test_the_topic_table_matches_the_topics() -> None:
    rows = _rows(DOC.split("## Topics", 1)[1].split("## Records", 1)[0])
    specs = {spec.name: spec for spec in topic_specs(Settings())}
    assert set(rows) == set(TOPIC_RECORDS)
    for topic, (_, record, partitions, cleanup, _) in rows.items():
        spec = specs[topic]
        assert record == TOPIC_RECORDS[topic], topic
        assert cleanup == spec.config.get("cleanup.policy", "delete"), topic
        if topic in ("capacity", "deadletter"):
            assert partitions == "1" == str(spec.partitions), topic
        else:
            assert partitions.startswith("`TAGSTREAM_TOPIC_PARTITIONS`"), topic


@pytest.mark.parametrize("record", RECORD_NAMES)
def test_every_field_is_documented_with_its_stability(record: str) -> None:
    schema = json.loads((REPO / "schemas" / f"{record}.avsc").read_text())
    rows = _rows(_section(f"{record} ("))
    fields = {f["name"]: f for f in schema["fields"]}
    missing = sorted(set(fields) - set(rows))
    assert not missing, f"docs/consumers.md, {record}: add a row for {missing}"
    assert not set(rows) - set(fields), f"docs/consumers.md, {record}: no such fields"
    for name, field in fields.items():
        stable = rows[name][1]
        if "default" in field:
            expected = f"default `{json.dumps(field['default'])}`"
            assert stable == expected, f"{record}.{name}: the doc says {stable!r}, not {expected!r}"
        else:
            assert stable == "yes", f"{record}.{name} has no default: it is stable"


def test_the_single_object_snippet_reads_every_record() -> None:
    decode = snippets()["single_object_decoder"]["single_object_decoder"](REPO / "schemas")
    for record, value in VALUES.items():
        assert decode(Codec().encode(record, value)) == value
    with pytest.raises(ValueError, match="not an Avro single-object message"):
        decode(b"\x00\x00\x00\x00\x01")


def test_the_repeat_filter_snippet() -> None:
    seen = snippets()["Seen"]["Seen"](size=2)
    added = [seen.add(k) for k in ("a", "b", "a", "c", "b", "b")]
    assert added == [True, True, False, True, True, False]
