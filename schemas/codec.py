"""The one Avro codec of tagstream: every process encodes and decodes records here.

The record schemas are the ``*.avsc`` files shipped beside this module, parsed once at
import and keyed by record name (``Tweet``, ``ImageEvent``, ...). Two wire formats:

* without a schema registry, Avro single-object encoding: ``C3 01``, the 8-byte
  little-endian CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form, the body;
* with a registry, the Confluent wire format: ``00``, the 4-byte big-endian schema id,
  the body. Schemas are registered under ``<topic>-value`` (TopicNameStrategy).

Decoding accepts both formats whatever the configuration, so a topic can move from one to
the other without a flag day. The writer schema is found by fingerprint or id and read
with the current schema of the expected record as reader schema, so older writers stay
readable and newer readers get their defaults.

Every failure, bad input or unreachable registry alike, raises `CodecError`; callers turn
it into a DeadLetter record.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from schemas.errors import CodecError

__all__ = ["RECORD_NAMES", "SINGLE_OBJECT_MARKER", "CONFLUENT_MAGIC", "Codec"]

#: The two bytes that open every Avro single-object encoded message.
SINGLE_OBJECT_MARKER = b"\xc3\x01"
#: The byte that opens every Confluent wire format message.
CONFLUENT_MAGIC = b"\x00"

_NAMESPACE = "tagstream"
_SINGLE_OBJECT_HEADER = len(SINGLE_OBJECT_MARKER) + 8
_CONFLUENT_HEADER = struct.Struct(">bI")
_REGISTRY_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# Bytes of a bad message shown in errors: enough to recognise JSON, text or another
# framing, short enough to keep dead letters small.
_PREVIEW_BYTES = 8


@dataclass(frozen=True, slots=True, eq=False)
class _Schema:
    """One parsed record schema with what both wire formats need, computed once."""

    name: str  # full name, e.g. tagstream.Tweet
    raw: dict[str, Any]  # as written, docs and defaults included: what a registry gets
    parsed: dict[str, Any]  # fastavro's parsed form, reused on every call
    fingerprint: bytes  # CRC-64-AVRO of the canonical form, little-endian
    aliases: frozenset[str] = field(default_factory=frozenset)

    @property
    def short_name(self) -> str:
        return self.name.rpartition(".")[2]


def _build_schema(raw: Mapping[str, Any], *, origin: str) -> _Schema:
    if not isinstance(raw, Mapping) or raw.get("type") not in ("record", "error"):
        raise CodecError(f"{origin}: not an Avro record schema")
    raw = json.loads(json.dumps(raw))  # a private deep copy: callers may mutate theirs
    try:
        # A fresh named-types table per schema (fastavro's default), so two versions of
        # Tweet can both define tagstream.Media without clashing.
        parsed = fastavro.parse_schema(raw)
        canonical = to_parsing_canonical_form(parsed)
        # fastavro already returns the CRC-64-AVRO bytes little-endian, as the
        # single-object encoding wants them (and as the Java implementation does).
        fp = bytes.fromhex(_fastavro_fingerprint(canonical, "CRC-64-AVRO"))
    except Exception as exc:  # SchemaParseException, UnknownType, KeyError on bad shapes
        raise CodecError(f"{origin}: invalid Avro schema: {exc}") from exc
    name = parsed["name"]
    namespace = name.rpartition(".")[0]
    aliases = frozenset(
        alias if "." in alias or not namespace else f"{namespace}.{alias}"
        for alias in raw.get("aliases", ())
    )
    return _Schema(name=name, raw=raw, parsed=parsed, fingerprint=fp, aliases=aliases)


def _load_shipped() -> dict[str, _Schema]:
    shipped: dict[str, _Schema] = {}
    for path in sorted(Path(__file__).parent.glob("*.avsc")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CodecError(f"{path.name}: cannot read schema: {exc}") from exc
        schema = _build_schema(raw, origin=path.name)
        if schema.short_name in shipped:
            raise CodecError(f"{path.name}: record {schema.short_name} is defined twice")
        shipped[schema.short_name] = schema
    return shipped


_SHIPPED = _load_shipped()

#: The records shipped with tagstream, by short name.
RECORD_NAMES: tuple[str, ...] = tuple(_SHIPPED)


def _preview(data: bytes | bytearray | memoryview) -> str:
    head = bytes(data[:_PREVIEW_BYTES]).hex(" ")
    more = " ..." if len(data) > _PREVIEW_BYTES else ""
    return f"{head}{more} ({len(data)} bytes)"


def _short_repr(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Registry:
    """A minimal Confluent schema registry client on urllib: register and fetch by id."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        # Credentials in the URL go into a header and never into messages: urllib would
        # not use them anyway, and error text ends up in dead letters and logs.
        self.base = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
        if parts.scheme not in ("http", "https") or not host:
            raise CodecError(f"schema registry URL must be http(s)://host[:port]: {self.base!r}")
        self.timeout_s = timeout_s
        self._headers = {"Accept": _REGISTRY_CONTENT_TYPE}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"

    def register(self, subject: str, schema: _Schema) -> int:
        body = json.dumps({"schema": json.dumps(schema.raw, separators=(",", ":"))}).encode()
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        answer = self._call("POST", path, body)
        schema_id = answer.get("id")
        if not isinstance(schema_id, int):
            raise CodecError(f"schema registry {self.base}: POST {path} gave no schema id")
        return schema_id

    def fetch(self, schema_id: int) -> dict[str, Any]:
        path = f"/schemas/ids/{schema_id}"
        text = self._call("GET", path).get("schema")
        if not isinstance(text, str):
            raise CodecError(f"schema registry {self.base}: GET {path} gave no schema")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CodecError(
                f"schema registry {self.base}: schema id {schema_id} is not JSON"
            ) from exc

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = _REGISTRY_CONTENT_TYPE
        request = urllib.request.Request(
            self.base + path, data=body, method=method, headers=headers
        )
        where = f"schema registry {self.base}: {method} {path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise CodecError(f"{where} answered {exc.code}: {_registry_message(exc)}") from None
        except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad URL
            reason = getattr(exc, "reason", exc)
            raise CodecError(f"{where} failed: {reason}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise CodecError(f"{where} answered with something other than a JSON object")
        return answer


def _registry_message(error: urllib.error.HTTPError) -> str:
    # The registry explains refusals (incompatible schema, unknown id) in a JSON body.
    try:
        answer = json.loads(error.read() or b"null")
    except (OSError, ValueError):
        answer = None
    if isinstance(answer, dict) and answer.get("message"):
        return f"{answer['message']} (error code {answer.get('error_code', '?')})"
    return error.reason if isinstance(error.reason, str) else "no detail"


class RegistrySettings(Protocol):
    """What `Codec.from_settings` reads of the settings object (infra/settings.py)."""

    schema_registry_url: str | None


class Codec:
    """Encodes and decodes tagstream records as Avro, with or without a schema registry.

    One instance per process is enough: schemas are parsed once and registry answers
    are cached. The first encode of a record per topic (and the first decode of an
    unknown schema id) calls the registry synchronously, within ``timeout_s``.
    """

    def __init__(
        self,
        *,
        registry_url: str | None = None,
        timeout_s: float = 5.0,
        reader_schemas: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """``reader_schemas`` replace the shipped schema of the records they name: the
        codec then writes and reads with them (a newer deployment, evolution tests)."""
        self._current: dict[str, _Schema] = {}
        self._by_fingerprint: dict[bytes, _Schema] = {}
        for schema in _SHIPPED.values():
            self._add_current(schema)
        for raw in reader_schemas:
            self._add_current(_build_schema(raw, origin="reader schema"))
        self._registry = _Registry(registry_url, timeout_s=timeout_s) if registry_url else None
        # Plain dicts shared by threads: a race costs at most one duplicate registry call,
        # and registering the same schema twice gives the same id.
        self._ids: dict[tuple[str, str], int] = {}
        self._by_id: dict[int, _Schema] = {}

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Codec:
        """The codec the settings ask for: a registry when one is configured."""
        return cls(registry_url=settings.schema_registry_url)

    def __repr__(self) -> str:
        where = self._registry.base if self._registry else "single-object"
        return f"Codec({where}, records={len(RECORD_NAMES)})"

    # Schemas ------------------------------------------------------------------------

    def _add_current(self, schema: _Schema) -> None:
        self._current[schema.short_name] = schema
        self._current[schema.name] = schema
        self._by_fingerprint[schema.fingerprint] = schema

    def register_writer_schema(self, schema: Mapping[str, Any]) -> None:
        """Accept bytes written with ``schema`` (e.g. an older version) in single-object
        encoding. Schemas already known keep their entry."""
        built = _build_schema(schema, origin="writer schema")
        self._by_fingerprint.setdefault(built.fingerprint, built)

    def _schema(self, record: str, action: str) -> _Schema:
        try:
            return self._current[record]
        except (KeyError, TypeError):
            known = ", ".join(RECORD_NAMES)
            raise CodecError(
                f"cannot {action} {record!r}: unknown record; known: {known}"
            ) from None

    # Encoding -----------------------------------------------------------------------

    def encode(self, record: str, value: Mapping[str, Any], *, topic: str | None = None) -> bytes:
        """``value`` as Avro bytes of ``record``; ``topic`` names the registry subject."""
        schema = self._schema(record, "encode")
        if not isinstance(value, Mapping):
            raise CodecError(
                f"cannot encode {schema.short_name}: expected a mapping, got {type(value).__name__}"
            )
        buffer = io.BytesIO()
        if self._registry is None:
            buffer.write(SINGLE_OBJECT_MARKER)
            buffer.write(schema.fingerprint)
        else:
            buffer.write(_CONFLUENT_HEADER.pack(0, self._schema_id(schema, topic)))
        try:
            fastavro.schemaless_writer(buffer, schema.parsed, value)
        except Exception as exc:  # TypeError, ValueError, AttributeError... from the C writer
            raise CodecError(_misfit(schema, value, exc)) from exc
        return buffer.getvalue()

    def _schema_id(self, schema: _Schema, topic: str | None) -> int:
        assert self._registry is not None
        subject = f"{topic}-value" if topic else schema.name
        key = (subject, schema.name)
        schema_id = self._ids.get(key)
        if schema_id is None:
            schema_id = self._registry.register(subject, schema)
            self._ids[key] = schema_id
            # Our own schema: decoding our own messages needs no fetch.
            self._by_id.setdefault(schema_id, schema)
        return schema_id

    # Decoding -----------------------------------------------------------------------

    def decode(self, record: str, data: bytes) -> dict[str, Any]:
        """The value of ``record`` in ``data``, in either wire format."""
        reader = self._schema(record, "decode")
        expected = reader.short_name
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"cannot decode {expected}: expected bytes, got {type(data).__name__}")
        if not data:
            raise CodecError(f"cannot decode {expected}: empty input")
        if data[:2] == SINGLE_OBJECT_MARKER:
            if len(data) < _SINGLE_OBJECT_HEADER:
                raise CodecError(
                    f"cannot decode {expected}: single-object header truncated: {_preview(data)}"
                )
            fp = bytes(data[2:_SINGLE_OBJECT_HEADER])
            writer = self._by_fingerprint.get(fp)
            if writer is None:
                raise CodecError(
                    f"cannot decode {expected}: unknown schema fingerprint {fp.hex()}: "
                    "not a shipped or registered writer schema"
                )
            offset = _SINGLE_OBJECT_HEADER
        elif data[:1] == CONFLUENT_MAGIC:
            if len(data) < _CONFLUENT_HEADER.size:
                raise CodecError(
                    f"cannot decode {expected}: Confluent header truncated: {_preview(data)}"
                )
            schema_id = _CONFLUENT_HEADER.unpack_from(data)[1]
            writer = self._writer_by_id(schema_id, expected)
            offset = _CONFLUENT_HEADER.size
        else:
            raise CodecError(
                f"cannot decode {expected}: unknown framing, starts {_preview(data)}; expected "
                "c3 01 (Avro single-object) or 00 (Confluent schema registry)"
            )
        if writer.name != reader.name and writer.name not in reader.aliases:
            raise CodecError(
                f"cannot decode {expected}: the bytes hold a {writer.short_name} record"
            )
        return _read_body(data, offset, writer, reader)

    def _writer_by_id(self, schema_id: int, expected: str) -> _Schema:
        writer = self._by_id.get(schema_id)
        if writer is not None:
            return writer
        if self._registry is None:
            raise CodecError(
                f"cannot decode {expected}: Confluent wire format (schema id {schema_id}) "
                "but no schema registry is configured"
            )
        try:
            raw = self._registry.fetch(schema_id)
            fetched = _build_schema(raw, origin=f"schema id {schema_id}")
        except CodecError as exc:
            raise CodecError(f"cannot decode {expected}: {exc}") from exc
        # The same schema as one we know: reuse it, so reading needs no resolution step.
        writer = self._by_fingerprint.get(fetched.fingerprint, fetched)
        self._by_id[schema_id] = writer
        return writer


def _read_body(
    data: bytes | bytearray | memoryview, offset: int, writer: _Schema, reader: _Schema
) -> dict[str, Any]:
    buffer = io.BytesIO(data)
    buffer.seek(offset)
    expected = reader.short_name
    # Same schema object: skip resolution, fastavro's slow path.
    reader_parsed = None if writer is reader else reader.parsed
    try:
        value = fastavro.schemaless_reader(buffer, writer.parsed, reader_parsed)
    except EOFError:
        raise CodecError(
            f"cannot decode {expected}: body truncated ({len(data) - offset} bytes after header)"
        ) from None
    except SchemaResolutionError as exc:
        raise CodecError(
            f"cannot decode {expected}: writer schema cannot be read as the current one: {exc}"
        ) from None
    except Exception as exc:  # IndexError, UnicodeDecodeError, ValueError, MemoryError...
        raise CodecError(
            f"cannot decode {expected}: corrupt body: {type(exc).__name__}: {exc}"
        ) from None
    left = len(data) - buffer.tell()
    if left:
        # One message is one body: leftovers mean a wrong writer schema or corruption.
        raise CodecError(f"cannot decode {expected}: {left} bytes left after the body")
    return value


def _misfit(schema: _Schema, value: Mapping[str, Any], error: Exception) -> str:
    """Why ``value`` does not fit ``schema``, naming the field when fastavro can tell."""
    prefix = f"cannot encode {schema.short_name}"
    try:
        # Only on failure: validation costs several times a write.
        validate(value, schema.parsed, raise_errors=True)
    except ValidationError as exc:
        # fastavro reports a union once per branch: merge them per field.
        expected: dict[str, list[str]] = {}
        got: dict[str, str] = {}
        for e in exc.errors:
            expected.setdefault(e.field, []).append(_describe_type(e.schema))
            got.setdefault(e.field, _short_repr(e.datum))
        details = [
            f"field {name}: got {got[name]}, expected {' or '.join(types)}"
            for name, types in list(expected.items())[:3]
        ]
        return f"{prefix}: " + "; ".join(details)
    except Exception:  # the writer's own message below says enough
        pass
    return f"{prefix}: {type(error).__name__}: {error}"


def _describe_type(schema: object) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return " or ".join(_describe_type(s) for s in schema)
    if isinstance(schema, Mapping):
        return str(schema.get("name") or schema.get("type"))
    return str(schema)
