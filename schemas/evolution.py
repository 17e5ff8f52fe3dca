"""Schema evolution: the compatibility policy of tagstream's records, and its check.

The policy is FULL, held against every release: each schema in ``schemas/`` must read the
data every earlier release wrote (BACKWARD), and every earlier release must read the data
written with it (FORWARD). A release's schemas are kept under
``schemas/history/<version>/``, so a clean clone can check without git history, and
``tests/unit/test_schema_evolution.py`` runs the check in ``make test``: a breaking
change fails the build with a message that names the record, the field and what broke,
e.g. ``HashtagResult.provider: added without a default, so data written by 0.1.0 cannot
be read``.

What FULL allows: adding a field with a default, removing a field that has a default,
adding or removing a record, docs and aliases. What it refuses: a field added or removed
without a default, a type changed in any way Avro cannot resolve both ways (so even
int -> long, which only resolves one way), a union branch or an enum symbol added or
removed, a record renamed without an alias, and a default that does not fit its type.

The rules are the Avro specification's schema resolution; this module applies them to the
schema JSON so that every break can be named by field. Apache Avro's own checker
(``avro.compatibility``) says only *that* a pair is incompatible and where, as a JSON
pointer; the tests hold both to the same verdict on every case they try.

``python -m schemas.evolution`` prints the verdict (exit status 1 on a break).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["HISTORY_DIR", "POLICY", "Break", "check_history", "check_pair", "releases"]

#: The compatibility policy of every record, against every release in `HISTORY_DIR`.
POLICY: Literal["FULL"] = "FULL"
#: One folder per release, named by its version, holding that release's ``*.avsc``.
HISTORY_DIR = Path(__file__).parent / "history"
SCHEMA_DIR = Path(__file__).parent

Policy = Literal["BACKWARD", "FORWARD", "FULL"]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
#: What a reader of each type can also read (the specification's promotions), by writer type.
_PROMOTIONS = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class Break:
    """One incompatibility: where (the record and a field path within it) and what broke."""

    record: str
    field: str  # "provider", "media[].width"; "" for the record itself
    problem: str

    def __str__(self) -> str:
        return (
            f"{self.record}.{self.field}: {self.problem}"
            if self.field
            else (f"{self.record}: {self.problem}")
        )


# Schemas as a tree with named types resolved ---------------------------------------------


@dataclass(eq=False)
class _Field:
    name: str
    type: _Type
    aliases: frozenset[str]
    has_default: bool
    default: Any = None


@dataclass(eq=False)
class _Named:
    kind: Literal["record", "enum", "fixed"]
    name: str  # full name
    aliases: frozenset[str]
    fields: list[_Field] = field(default_factory=list)
    symbols: tuple[str, ...] = ()
    enum_default: str | None = None
    size: int = 0

    @property
    def short(self) -> str:
        return self.name.rpartition(".")[2]


@dataclass(eq=False)
class _Array:
    items: _Type


@dataclass(eq=False)
class _Map:
    values: _Type


@dataclass(eq=False)
class _Union:
    branches: list[_Type]


_Type = str | _Named | _Array | _Map | _Union


class SchemaShapeError(ValueError):
    """A schema this module cannot read: not the JSON of an Avro schema."""


def _full(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _resolve(schema: Any, namespace: str, names: dict[str, _Named]) -> _Type:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        for candidate in (_full(schema, namespace), schema):
            if candidate in names:
                return names[candidate]
        raise SchemaShapeError(f"unknown type {schema!r}")
    if isinstance(schema, list):
        return _Union([_resolve(s, namespace, names) for s in schema])
    if not isinstance(schema, Mapping) or "type" not in schema:
        raise SchemaShapeError(f"not an Avro schema: {schema!r}")
    kind = schema["type"]
    if kind in ("record", "error", "enum", "fixed"):
        name = _full(str(schema["name"]), str(schema.get("namespace", namespace)))
        inner = name.rpartition(".")[0]
        named = _Named(
            kind="record" if kind == "error" else kind,
            name=name,
            aliases=frozenset(_full(a, inner) for a in schema.get("aliases", ())),
        )
        names[name] = named  # before the fields: a record may refer to itself
        if kind == "enum":
            named.symbols = tuple(schema["symbols"])
            named.enum_default = schema.get("default")
        elif kind == "fixed":
            named.size = int(schema["size"])
        else:
            for f in schema["fields"]:
                named.fields.append(
                    _Field(
                        name=f["name"],
                        type=_resolve(f["type"], inner, names),
                        aliases=frozenset(f.get("aliases", ())),
                        has_default="default" in f,
                        default=f.get("default"),
                    )
                )
        return named
    if kind == "array":
        return _Array(_resolve(schema["items"], namespace, names))
    if kind == "map":
        return _Map(_resolve(schema["values"], namespace, names))
    return _resolve(kind, namespace, names)  # {"type": "string"} and the like


def _tree(schema: Mapping[str, Any]) -> _Named:
    root = _resolve(schema, "", {})
    if not isinstance(root, _Named) or root.kind != "record":
        raise SchemaShapeError("not a record schema")
    return root


def _describe(t: _Type) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, _Named):
        return t.short
    if isinstance(t, _Array):
        return f"array<{_describe(t.items)}>"
    if isinstance(t, _Map):
        return f"map<{_describe(t.values)}>"
    return "[" + ", ".join(_describe(b) for b in t.branches) + "]"


# Resolution: can a reader of one schema read data written with another? ---------------


@dataclass
class _Direction:
    """Which side is the release: BACKWARD reads the release's data with the current
    schema; FORWARD reads current data with the release's schema."""

    release: str
    backward: bool
    record: str
    found: list[Break] = field(default_factory=list)
    # Pairs of named types being compared: a recursive record is compatible with itself.
    seen: set[tuple[int, int]] = field(default_factory=set)

    @property
    def consequence(self) -> str:
        if self.backward:
            return f"so data written by {self.release} cannot be read"
        return f"so {self.release} readers cannot read data written now"

    def old_new(self, reader: _Type, writer: _Type) -> tuple[_Type, _Type]:
        return (writer, reader) if self.backward else (reader, writer)

    def add(self, path: str, problem: str) -> None:
        self.found.append(Break(self.record, path, f"{problem}, {self.consequence}"))


def _match(reader: _Type, writer: _Type) -> bool:
    """Whether the types match at the top (the specification's first step of resolution)."""
    if isinstance(writer, _Union) or isinstance(reader, _Union):
        return False
    if isinstance(reader, str) and isinstance(writer, str):
        return reader == writer or reader in _PROMOTIONS.get(writer, ())
    if isinstance(reader, _Named) and isinstance(writer, _Named):
        return reader.kind == writer.kind and (
            reader.name == writer.name or writer.name in reader.aliases
        )
    return (isinstance(reader, _Array) and isinstance(writer, _Array)) or (
        isinstance(reader, _Map) and isinstance(writer, _Map)
    )


def _read(reader: _Type, writer: _Type, path: str, d: _Direction) -> None:
    """Record in ``d`` every way ``reader`` fails to read data written with ``writer``."""
    if isinstance(writer, _Union) and isinstance(reader, _Union):
        for branch in writer.branches:
            chosen = next((r for r in reader.branches if _match(r, branch)), None)
            if chosen is not None:
                _read(chosen, branch, path, d)
            elif d.backward:
                d.add(path, f"the union no longer has a branch for {_describe(branch)}")
            else:
                d.add(path, f"the union has a new branch {_describe(branch)}")
        return
    if isinstance(writer, _Union):
        # Every branch the writer may have taken must be readable by the one reader type.
        if any(not _match(reader, branch) for branch in writer.branches):
            old, new = d.old_new(reader, writer)
            d.add(path, f"type changed from {_describe(old)} to {_describe(new)}")
        for branch in writer.branches:
            if _match(reader, branch):
                _read(reader, branch, path, d)
        return
    if isinstance(reader, _Union):
        chosen = next((r for r in reader.branches if _match(r, writer)), None)
        if chosen is None:
            old, new = d.old_new(reader, writer)
            d.add(path, f"type changed from {_describe(old)} to {_describe(new)}")
            return
        _read(chosen, writer, path, d)
        return
    if not _match(reader, writer):
        old, new = d.old_new(reader, writer)
        if isinstance(old, _Named) and isinstance(new, _Named) and old.kind == new.kind:
            d.add(path, f"{old.kind} {old.name} renamed to {new.name} without an alias")
        elif isinstance(old, str) and isinstance(new, str) and old in _PROMOTIONS.get(new, ()):
            d.add(
                path,
                f"type changed from {old} to {new}; Avro promotes {new} to {old}, not back",
            )
        elif isinstance(old, str) and isinstance(new, str) and new in _PROMOTIONS.get(old, ()):
            d.add(
                path,
                f"type changed from {old} to {new}; Avro promotes {old} to {new}, not back",
            )
        else:
            d.add(path, f"type changed from {_describe(old)} to {_describe(new)}")
        return
    if isinstance(reader, _Array) and isinstance(writer, _Array):
        _read(reader.items, writer.items, f"{path}[]", d)
    elif isinstance(reader, _Map) and isinstance(writer, _Map):
        _read(reader.values, writer.values, f"{path}{{}}", d)
    elif isinstance(reader, _Named) and isinstance(writer, _Named):
        _read_named(reader, writer, path, d)


def _read_named(reader: _Named, writer: _Named, path: str, d: _Direction) -> None:
    pair = (id(reader), id(writer))
    if pair in d.seen:
        return
    d.seen.add(pair)
    if reader.kind == "fixed" and reader.size != writer.size:
        old, new = d.old_new(reader, writer)
        assert isinstance(old, _Named) and isinstance(new, _Named)
        d.add(path, f"fixed {reader.name} changed size from {old.size} to {new.size}")
    elif reader.kind == "enum":
        unknown = [s for s in writer.symbols if s not in reader.symbols]
        if unknown and reader.enum_default is None:
            listed = ", ".join(unknown)
            if d.backward:
                d.add(path, f"enum {reader.name} lost symbols {listed}")
            else:
                d.add(
                    path,
                    f"enum {reader.name} has new symbols {listed} and {d.release} declares no "
                    "enum default",
                )
    elif reader.kind == "record":
        by_name = {f.name: f for f in writer.fields}
        for rf in reader.fields:
            wf = by_name.get(rf.name) or next(
                (by_name[a] for a in sorted(rf.aliases) if a in by_name), None
            )
            where = f"{path}.{rf.name}" if path else rf.name
            if wf is not None:
                _read(rf.type, wf.type, where, d)
            elif not rf.has_default:
                if d.backward:
                    d.add(where, "added without a default")
                else:
                    d.add(where, f"removed, and {d.release} has no default for it")


# Defaults -----------------------------------------------------------------------------


def _fits(t: _Type, value: Any) -> bool:
    """Whether ``value`` is a valid JSON default for type ``t`` (a union's: its first branch)."""
    if isinstance(t, _Union):
        return bool(t.branches) and _fits(t.branches[0], value)
    if isinstance(t, _Array):
        return isinstance(value, list) and all(_fits(t.items, v) for v in value)
    if isinstance(t, _Map):
        return isinstance(value, dict) and all(_fits(t.values, v) for v in value.values())
    if isinstance(t, _Named):
        if t.kind == "enum":
            return value in t.symbols
        if t.kind == "fixed":
            return isinstance(value, str) and len(value) == t.size
        return isinstance(value, dict) and all(
            _fits(f.type, value[f.name]) if f.name in value else f.has_default for f in t.fields
        )
    if t == "null":
        return value is None
    if t == "boolean":
        return isinstance(value, bool)
    if t in ("int", "long"):
        low, high = _INT_RANGE[t]
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if t in ("float", "double"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)  # bytes and string defaults are JSON strings


def _bad_defaults(t: _Type, path: str, record: str, seen: set[int]) -> Iterable[Break]:
    if isinstance(t, _Union):
        for branch in t.branches:
            yield from _bad_defaults(branch, path, record, seen)
    elif isinstance(t, _Array):
        yield from _bad_defaults(t.items, f"{path}[]", record, seen)
    elif isinstance(t, _Map):
        yield from _bad_defaults(t.values, f"{path}{{}}", record, seen)
    elif isinstance(t, _Named) and t.kind == "record" and id(t) not in seen:
        seen.add(id(t))
        for f in t.fields:
            where = f"{path}.{f.name}" if path else f.name
            if f.has_default and not _fits(f.type, f.default):
                what = "its first branch" if isinstance(f.type, _Union) else "its type"
                yield Break(
                    record,
                    where,
                    f"default {json.dumps(f.default)} does not fit {what} "
                    f"{_describe(f.type)}, so readers of data without the field fail",
                )
            yield from _bad_defaults(f.type, where, record, seen)


# The check ------------------------------------------------------------------------------


def check_pair(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    release: str,
    policy: Policy = POLICY,
) -> list[Break]:
    """Every way ``new`` breaks ``policy`` against ``old``, the schema of ``release``.

    Also refuses a default in ``new`` that does not fit its field's type: a reader that
    needs it (BACKWARD reads every old record with it) would fail."""
    try:
        old_tree, new_tree = _tree(old), _tree(new)
    except (SchemaShapeError, KeyError, TypeError, ValueError) as exc:
        raise SchemaShapeError(f"cannot compare {old.get('name')!r}: {exc}") from exc
    record = old_tree.short
    found = list(_bad_defaults(new_tree, "", new_tree.short, set()))
    if policy in ("BACKWARD", "FULL"):
        d = _Direction(release, backward=True, record=record)
        _read(new_tree, old_tree, "", d)
        found.extend(d.found)
    if policy in ("FORWARD", "FULL"):
        d = _Direction(release, backward=False, record=record)
        _read(old_tree, new_tree, "", d)
        found.extend(d.found)
    return found


def _version_key(name: str) -> tuple[int | str, ...]:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def releases(history_dir: Path = HISTORY_DIR) -> list[str]:
    """The releases kept in ``history_dir``, oldest first."""
    if not history_dir.is_dir():
        return []
    return sorted((p.name for p in history_dir.iterdir() if p.is_dir()), key=_version_key)


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaShapeError(f"{path}: cannot read schema: {exc}") from exc


def check_history(
    schema_dir: Path = SCHEMA_DIR,
    history_dir: Path = HISTORY_DIR,
    *,
    policy: Policy = POLICY,
) -> list[Break]:
    """Every break of the schemas in ``schema_dir`` against each release in ``history_dir``.

    A record of a release that is no longer in ``schema_dir`` is a break too: its topic's
    data would have no schema to be read with."""
    found: list[Break] = []
    current = {p.stem: p for p in schema_dir.glob("*.avsc")}
    for release in releases(history_dir):
        for path in sorted((history_dir / release).glob("*.avsc")):
            if path.stem not in current:
                found.append(
                    Break(path.stem, "", f"removed, so data written by {release} cannot be read")
                )
                continue
            found.extend(
                check_pair(_load(path), _load(current[path.stem]), release=release, policy=policy)
            )
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the verdict of `check_history` on the shipped schemas; 1 when anything broke."""
    del argv
    known = releases()
    found = check_history()
    for brk in found:
        print(brk, file=sys.stderr)
    if found:
        print(f"{len(found)} breaks of the {POLICY} policy", file=sys.stderr)
        return 1
    print(f"schemas keep the {POLICY} policy against {', '.join(known) or 'no release'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
