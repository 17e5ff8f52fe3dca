"""The schema evolution policy (FULL against every release), and the checker that holds it.

`test_shipped_schemas_keep_the_policy` is the CI check: a schema in schemas/ that breaks
the policy against a release under schemas/history/ fails `make test` with the checker's
messages. The rest try the checker on deliberately broken schemas, and hold its verdict to
Apache Avro's own compatibility checker.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from schemas.codec import RECORD_NAMES
from schemas.evolution import (
    HISTORY_DIR,
    POLICY,
    SCHEMA_DIR,
    Break,
    SchemaShapeError,
    check_history,
    check_pair,
    main,
    releases,
)

RELEASE = "0.1.0"


def released(record: str) -> dict[str, Any]:
    return json.loads((HISTORY_DIR / RELEASE / f"{record}.avsc").read_text(encoding="utf-8"))


def test_shipped_schemas_keep_the_policy() -> None:
    breaks = check_history()
    assert not breaks, f"schemas/ breaks the {POLICY} policy:\n" + "\n".join(map(str, breaks))


def test_the_first_release_is_kept() -> None:
    # 0.1.0 (git 4de7079) shipped every record we ship now: none may disappear.
    assert releases()[0] == RELEASE
    assert {p.stem for p in (HISTORY_DIR / RELEASE).glob("*.avsc")} == set(RECORD_NAMES)
    assert POLICY == "FULL"


# Deliberately broken (and harmless) changes --------------------------------------------


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def _media(schema: dict[str, Any]) -> dict[str, Any]:
    return _field(schema, "media")["type"]["items"]


def _drop(schema: dict[str, Any], name: str) -> None:
    schema["fields"] = [f for f in schema["fields"] if f["name"] != name]


def _add(schema: dict[str, Any], spec: dict[str, Any]) -> None:
    schema["fields"].append(spec)


Change = Callable[[dict[str, Any]], None]

# record, change, the breaks expected (empty: FULL-compatible)
CASES: list[tuple[str, str, Change, list[str]]] = [
    (
        "HashtagResult",
        "field added with a default",
        lambda s: _add(s, {"name": "provider", "type": "string", "default": "onnxruntime"}),
        [],
    ),
    (
        "Tweet",
        "optional field added",
        lambda s: _add(s, {"name": "lang", "type": ["null", "string"], "default": None}),
        [],
    ),
    (
        "ShedRecord",
        "field with a default removed",
        lambda s: _drop(s, "detail"),
        [],
    ),
    (
        "Tweet",
        "docs and an alias changed",
        lambda s: s.update(doc="changed", aliases=["Post"]),
        [],
    ),
    (
        "HashtagResult",
        "field added without a default",
        lambda s: _add(s, {"name": "provider", "type": "string"}),
        [
            "HashtagResult.provider: added without a default, so data written by 0.1.0 "
            "cannot be read"
        ],
    ),
    (
        "HashtagResult",
        "field without a default removed",
        lambda s: _drop(s, "model_id"),
        [
            "HashtagResult.model_id: removed, and 0.1.0 has no default for it, so 0.1.0 "
            "readers cannot read data written now"
        ],
    ),
    (
        "ImageEvent",
        "int widened to long (one way only)",
        lambda s: _field(s, "position").update(type="long"),
        [
            "ImageEvent.position: type changed from int to long; Avro promotes int to long, "
            "not back, so 0.1.0 readers cannot read data written now"
        ],
    ),
    (
        "CapacityReport",
        "long narrowed to int",
        lambda s: _field(s, "queue_depth").update(type="int"),
        [
            "CapacityReport.queue_depth: type changed from long to int; Avro promotes int to "
            "long, not back, so data written by 0.1.0 cannot be read"
        ],
    ),
    (
        "Tweet",
        "string to int",
        lambda s: _field(s, "text").update(type="int"),
        [
            "Tweet.text: type changed from string to int, so data written by 0.1.0 cannot be read",
            "Tweet.text: type changed from string to int, so 0.1.0 readers cannot read data "
            "written now",
        ],
    ),
    (
        "Tweet",
        "a nested field's type",
        lambda s: _field(_media(s), "width").update(type=["null", "string"]),
        [
            "Tweet.media[].width: the union no longer has a branch for int, so data written "
            "by 0.1.0 cannot be read",
            "Tweet.media[].width: the union has a new branch string, so 0.1.0 readers cannot "
            "read data written now",
        ],
    ),
    (
        "Tweet",
        "a nested field added without a default",
        lambda s: _add(_media(s), {"name": "duration_ms", "type": "long"}),
        [
            "Tweet.media[].duration_ms: added without a default, so data written by 0.1.0 "
            "cannot be read"
        ],
    ),
    (
        "Tweet",
        "optional made required",
        lambda s: _field(s, "author_id").update(type="string", default=""),
        [
            "Tweet.author_id: type changed from [null, string] to string, so data written by "
            "0.1.0 cannot be read"
        ],
    ),
    (
        "HashtagResult",
        "map values float to double",
        lambda s: _field(s, "scores")["type"].update(values="double"),
        [
            "HashtagResult.scores{}: type changed from float to double; Avro promotes float "
            "to double, not back, so 0.1.0 readers cannot read data written now"
        ],
    ),
    (
        "DeadLetter",
        "record renamed",
        lambda s: s.update(name="Failure"),
        [
            "DeadLetter: record tagstream.DeadLetter renamed to tagstream.Failure without an "
            "alias, so data written by 0.1.0 cannot be read",
            "DeadLetter: record tagstream.DeadLetter renamed to tagstream.Failure without an "
            "alias, so 0.1.0 readers cannot read data written now",
        ],
    ),
    (
        "ShedRecord",
        "reason made an enum",
        lambda s: _field(s, "reason").update(
            type={"type": "enum", "name": "Reason", "symbols": ["no_photo", "over_rate"]}
        ),
        [
            "ShedRecord.reason: type changed from string to Reason, so data written by 0.1.0 "
            "cannot be read",
            "ShedRecord.reason: type changed from string to Reason, so 0.1.0 readers cannot "
            "read data written now",
        ],
    ),
]


def _new(record: str, change: Change) -> dict[str, Any]:
    schema = copy.deepcopy(released(record))
    change(schema)
    return schema


@pytest.mark.parametrize(
    ("record", "change", "expected"),
    [pytest.param(r, c, e, id=why) for r, why, c, e in CASES],
)
def test_the_checker_names_what_broke(record: str, change: Change, expected: list[str]) -> None:
    assert [
        str(b) for b in check_pair(released(record), _new(record, change), release=RELEASE)
    ] == (expected)


def _avro_verdict(reader: dict[str, Any], writer: dict[str, Any]) -> bool:
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer))
    )
    return result.compatibility is SchemaCompatibilityType.compatible


@pytest.mark.parametrize(
    ("record", "change"), [pytest.param(r, c, id=why) for r, why, c, _ in CASES]
)
def test_the_checker_agrees_with_apache_avro(record: str, change: Change) -> None:
    old, new = released(record), _new(record, change)
    for policy, reader, writer in (("BACKWARD", new, old), ("FORWARD", old, new)):
        ours = not check_pair(old, new, release=RELEASE, policy=policy)  # type: ignore[arg-type]
        assert ours == _avro_verdict(reader, writer), policy


ENUM_OLD = {
    "type": "record",
    "name": "R",
    "namespace": "t",
    "fields": [
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["a", "b"]}},
        {"name": "id", "type": {"type": "fixed", "name": "Id", "size": 16}},
    ],
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: s["fields"][0]["type"].update(symbols=["a", "b", "c"]),
            [
                "R.kind: enum t.Kind has new symbols c and 0.1.0 declares no enum default, so "
                "0.1.0 readers cannot read data written now"
            ],
        ),
        (
            lambda s: s["fields"][0]["type"].update(symbols=["a"]),
            ["R.kind: enum t.Kind lost symbols b, so data written by 0.1.0 cannot be read"],
        ),
        (
            lambda s: s["fields"][1]["type"].update(size=8),
            [
                "R.id: fixed t.Id changed size from 16 to 8, so data written by 0.1.0 cannot "
                "be read",
                "R.id: fixed t.Id changed size from 16 to 8, so 0.1.0 readers cannot read data "
                "written now",
            ],
        ),
    ],
)
def test_enums_and_fixed(change: Change, expected: list[str]) -> None:
    new = copy.deepcopy(ENUM_OLD)
    change(new)
    assert [str(b) for b in check_pair(ENUM_OLD, new, release=RELEASE)] == expected
    for policy, reader, writer in (("BACKWARD", new, ENUM_OLD), ("FORWARD", ENUM_OLD, new)):
        ours = not check_pair(ENUM_OLD, new, release=RELEASE, policy=policy)  # type: ignore[arg-type]
        assert ours == _avro_verdict(reader, writer), policy


def test_an_enum_default_lets_old_readers_read_new_symbols() -> None:
    old = copy.deepcopy(ENUM_OLD)
    old["fields"][0]["type"]["default"] = "a"
    new = copy.deepcopy(old)
    new["fields"][0]["type"]["symbols"] = ["a", "b", "c"]
    assert check_pair(old, new, release=RELEASE) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"name": "lang", "type": ["null", "string"], "default": "und"},
            'Tweet.lang: default "und" does not fit its first branch [null, string]',
        ),
        (
            {"name": "n", "type": "int", "default": 2**40},
            "Tweet.n: default 1099511627776 does not fit its type int",
        ),
        (
            {"name": "tags", "type": {"type": "array", "items": "string"}, "default": [1]},
            "Tweet.tags: default [1] does not fit its type array<string>",
        ),
    ],
)
def test_a_default_that_does_not_fit_is_a_break(spec: dict[str, Any], expected: str) -> None:
    new = copy.deepcopy(released("Tweet"))
    new["fields"].append(spec)
    found = [str(b) for b in check_pair(released("Tweet"), new, release=RELEASE)]
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_recursive_record_is_compared_once() -> None:
    node = {
        "type": "record",
        "name": "Node",
        "fields": [
            {"name": "value", "type": "string"},
            {"name": "children", "type": {"type": "array", "items": "Node"}, "default": []},
        ],
    }
    grown = copy.deepcopy(node)
    grown["fields"].append({"name": "weight", "type": "double", "default": 1.0})
    assert check_pair(node, grown, release=RELEASE) == []
    grown["fields"].append({"name": "colour", "type": "string"})
    assert [str(b) for b in check_pair(node, grown, release=RELEASE)] == [
        "Node.colour: added without a default, so data written by 0.1.0 cannot be read"
    ]


def test_not_a_schema_is_a_clear_error() -> None:
    with pytest.raises(SchemaShapeError, match="unknown type 'Missing'"):
        check_pair(
            released("Tweet"),
            {"type": "record", "name": "Tweet", "fields": [{"name": "a", "type": "Missing"}]},
            release=RELEASE,
        )


# Against a history folder ----------------------------------------------------------------


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    current = tmp_path / "schemas"
    history = current / "history"
    shutil.copytree(SCHEMA_DIR, current, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return current, history


def test_check_history_against_every_release(tmp_path: Path) -> None:
    current, history = _layout(tmp_path)
    # A later release added a field with a default: both releases pass.
    shutil.copytree(history / RELEASE, history / "0.2.0")
    v2 = json.loads((history / "0.2.0" / "HashtagResult.avsc").read_text())
    v2["fields"].append({"name": "provider", "type": "string", "default": "onnxruntime"})
    (history / "0.2.0" / "HashtagResult.avsc").write_text(json.dumps(v2))
    assert releases(history) == ["0.1.0", "0.2.0"]
    (current / "HashtagResult.avsc").write_text(json.dumps(v2))
    assert check_history(current, history) == []

    # Dropping the default is fine against 0.2.0, whose data always has the field, but
    # not against 0.1.0: the check is transitive, so old topic data stays readable.
    now = copy.deepcopy(v2)
    del now["fields"][-1]["default"]
    (current / "HashtagResult.avsc").write_text(json.dumps(now))
    assert [str(b) for b in check_history(current, history)] == [
        "HashtagResult.provider: added without a default, so data written by 0.1.0 cannot be read"
    ]


def test_a_removed_record_is_a_break(tmp_path: Path) -> None:
    current, history = _layout(tmp_path)
    (current / "CapacityReport.avsc").unlink()
    assert check_history(current, history) == [
        Break("CapacityReport", "", "removed, so data written by 0.1.0 cannot be read")
    ]


def test_main_prints_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert f"schemas keep the FULL policy against {RELEASE}" in capsys.readouterr().out
