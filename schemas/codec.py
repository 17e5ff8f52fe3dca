"""The one Avro codec of tagstream: every process encodes and decodes records here.

The record schemas are the ``*.avsc`` files shipped beside this module, parsed once at
import and keyed by record name (``Tweet``, ``ImageEvent``, ...). Two wire formats:

* without a schema registry (the default), Avro single-object encoding: ``C3 01``, the
  8-byte little-endian CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form, the
  body. Written and read here with fastavro: neither confluent-kafka nor fastavro frames
  single objects, so this framing is ours;
* with a registry, the Confluent wire format (``00``, the 4-byte big-endian schema id, the
  body), written and read by confluent-kafka's own `AvroSerializer` and `AvroDeserializer`
  on its `SchemaRegistryClient`, which registers and fetches schemas and caches both.
  Schemas are registered under ``<topic>-value`` (the library's topic subject-name
  strategy), or under the record's full name when no topic is given (its record
  strategy).

Decoding accepts both formats whatever the configuration, so a topic can move from one to
the other without a flag day. The writer schema is found by fingerprint or by registry id
and read with the current schema of the expected record as reader schema, so older
writers stay readable and newer readers get their defaults. The schemas of every earlier
release (``history/<version>/*.avsc``, see schemas/evolution.py) are known writer
schemas: single-object data written by any release decodes.

A record that cannot be encoded or decoded (bad input, a schema the registry refuses)
raises `CodecError`, which callers turn into a DeadLetter record. A registry that does not
answer raises `RegistryUnavailableError` instead: the record is fine, so it must not
become a dead letter; the Faust agent waits and tries again, the other processes stop
without committing what they had not finished.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fastavro
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    SchemaRegistryError,
    dual_schema_id_deserializer,
    record_subject_name_strategy,
    topic_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from schemas.errors import CodecError, RegistryUnavailableError

try:  # The HTTP client under SchemaRegistryClient, chosen as it chooses: httpx2, else httpx.
    import httpx2 as _http
except ImportError:  # pragma: no cover - older confluent-kafka releases
    import httpx as _http  # type: ignore[no-redef]

__all__ = ["RECORD_NAMES", "SINGLE_OBJECT_MARKER", "CONFLUENT_MAGIC", "Codec"]

#: The two bytes that open every Avro single-object encoded message.
SINGLE_OBJECT_MARKER = b"\xc3\x01"
#: The byte that opens every Confluent wire format message.
CONFLUENT_MAGIC = b"\x00"

_NAMESPACE = "tagstream"
_SINGLE_OBJECT_HEADER = len(SINGLE_OBJECT_MARKER) + 8
#: Answers of a registry that is away or overloaded (those its client retries), not refusals.
_UNAVAILABLE = frozenset({408, 429, 500, 502, 503, 504})
#: The byte that opens Confluent's newer framing, a 16-byte schema GUID after it.
_CONFLUENT_GUID_MAGIC = b"\x01"
_CONFLUENT_HEADER = struct.Struct(">bI")
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


def _read_schema_file(path: Path) -> _Schema:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CodecError(f"{path.name}: cannot read schema: {exc}") from exc
    return _build_schema(raw, origin=str(path.relative_to(_HERE)))


def _load_shipped() -> dict[str, _Schema]:
    shipped: dict[str, _Schema] = {}
    for path in sorted(_HERE.glob("*.avsc")):
        schema = _read_schema_file(path)
        if schema.short_name in shipped:
            raise CodecError(f"{path.name}: record {schema.short_name} is defined twice")
        shipped[schema.short_name] = schema
    return shipped


def _load_history() -> list[_Schema]:
    """The schemas of every earlier release: writers whose data must stay readable."""
    return [_read_schema_file(p) for p in sorted(_HERE.glob("history/*/*.avsc"))]


_HERE = Path(__file__).parent
_SHIPPED = _load_shipped()
_HISTORY = _load_history()

#: The records shipped with tagstream, by short name.
RECORD_NAMES: tuple[str, ...] = tuple(_SHIPPED)


def _preview(data: bytes | bytearray | memoryview) -> str:
    head = bytes(data[:_PREVIEW_BYTES]).hex(" ")
    more = " ..." if len(data) > _PREVIEW_BYTES else ""
    return f"{head}{more} ({len(data)} bytes)"


def _short_repr(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _registry_urls(url: str) -> tuple[str, str | None]:
    """``url`` (one URL or a comma-separated list) without credentials, and the credentials.

    The client would take ``user:password@`` from the URL itself, but then the URL it
    requests (and any error text that shows it, in dead letters and logs) would carry
    them: they go to the client as ``basic.auth.user.info`` instead."""
    bases: list[str] = []
    userinfo: str | None = None
    for one in (u.strip() for u in url.split(",")):
        parts = urllib.parse.urlsplit(one)
        host = parts.netloc.rpartition("@")[2]
        base = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
        if parts.scheme not in ("http", "https") or not host:
            raise CodecError(f"schema registry URL must be http(s)://host[:port]: {base!r}")
        if parts.username is not None and userinfo is None:
            user = urllib.parse.unquote(parts.username)
            userinfo = f"{user}:{urllib.parse.unquote(parts.password or '')}"
        bases.append(base)
    return ",".join(bases), userinfo


class _RegistryMode:
    """The Confluent wire format through confluent-kafka's registry client and serdes.

    One `AvroSerializer` per record and topic (so each registers under its own subject,
    once: the serializer remembers the subjects it registered) and one `AvroDeserializer`
    per record, with the record's current schema as reader schema. The client caches
    schemas by id both ways, so a process fetches each writer schema once.
    """

    def __init__(self, url: str, *, timeout_s: float, config: Mapping[str, Any]) -> None:
        self.base, userinfo = _registry_urls(url)
        conf: dict[str, Any] = {"url": self.base, "timeout": timeout_s, **config}
        if userinfo is not None:
            conf["basic.auth.user.info"] = userinfo
        try:
            self.client = SchemaRegistryClient(conf)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"schema registry {self.base}: {exc}") from None
        self._lock = threading.Lock()
        self._serializers: dict[tuple[str, str | None], AvroSerializer] = {}
        self._deserializers: dict[str, AvroDeserializer] = {}
        # What the deserializer left unread: the library does not check that one message
        # is one body, so its framing hook hands us the payload stream to check after.
        self._payload = threading.local()

    def _once(self, cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
        """`cache[key]`, made by `make` the first time, once even when threads race."""
        found = cache.get(key)
        if found is None:
            with self._lock:
                found = cache.get(key)
                if found is None:
                    found = cache[key] = make()
        return found

    def _serializer(self, schema: _Schema, topic: str | None) -> AvroSerializer:
        strategy = topic_subject_name_strategy if topic else record_subject_name_strategy
        return self._once(
            self._serializers,
            (schema.name, topic),
            lambda: AvroSerializer(
                self.client,
                json.dumps(schema.raw),
                conf={"auto.register.schemas": True, "subject.name.strategy": strategy},
            ),
        )

    def _deserializer(self, reader: _Schema) -> AvroDeserializer:
        return self._once(
            self._deserializers,
            reader.name,
            lambda: AvroDeserializer(
                self.client,
                json.dumps(reader.raw),
                conf={"schema.id.deserializer": self._framing},
            ),
        )

    def _framing(self, data: bytes, ctx: Any, schema_id: Any) -> io.BytesIO:
        payload = dual_schema_id_deserializer(data, ctx, schema_id)
        self._payload.stream = payload
        return payload

    def _unavailable(self, exc: Exception) -> bool:
        """The registry did not answer, as opposed to refusing this request."""
        if isinstance(exc, SchemaRegistryError):
            return exc.http_status_code in _UNAVAILABLE
        return True  # a transport error: refused, reset, timed out, no such host

    def _refusal(self, exc: Exception) -> str:
        if isinstance(exc, SchemaRegistryError):
            return (
                f"schema registry {self.base} answered {exc.http_status_code}: "
                f"{exc.error_message} (error code {exc.error_code})"
            )
        return f"schema registry {self.base} failed: {type(exc).__name__}: {exc}"

    def encode(self, schema: _Schema, value: Mapping[str, Any], topic: str | None) -> bytes:
        serializer = self._serializer(schema, topic)
        ctx = SerializationContext(topic, MessageField.VALUE) if topic else None
        try:
            data = serializer(value, ctx)
        except (SchemaRegistryError, _http.HTTPError) as exc:
            subject = f"{topic}-value" if topic else schema.name
            error = RegistryUnavailableError if self._unavailable(exc) else CodecError
            raise error(
                f"cannot encode {schema.short_name} (subject {subject}): {self._refusal(exc)}"
            ) from None
        except Exception as exc:  # TypeError, ValueError, ... from fastavro's writer
            raise CodecError(_misfit(schema, value, exc)) from exc
        assert data is not None  # None only for a None value, which encode() refuses
        return data

    def decode(self, reader: _Schema, data: bytes) -> dict[str, Any]:
        expected = reader.short_name
        self._payload.stream = None
        try:
            value = self._deserializer(reader)(data, None)
        except SerializationError as exc:
            raise CodecError(f"cannot decode {expected}: {exc}") from None
        except (SchemaRegistryError, _http.HTTPError) as exc:
            error = RegistryUnavailableError if self._unavailable(exc) else CodecError
            raise error(
                f"cannot decode {expected}: {_schema_ref(data)}: {self._refusal(exc)}"
            ) from None
        except SchemaResolutionError as exc:
            # The library says only that resolution failed; say which record it was.
            writer = self._writer_name(data)
            if writer is not None and writer != reader.name and writer not in reader.aliases:
                raise CodecError(
                    f"cannot decode {expected}: the bytes hold a {writer.rpartition('.')[2]} record"
                ) from None
            raise CodecError(
                f"cannot decode {expected}: writer schema cannot be read as the current one: {exc}"
            ) from None
        except EOFError:
            raise CodecError(f"cannot decode {expected}: body truncated") from None
        except Exception as exc:  # IndexError, UnicodeDecodeError, ValueError, MemoryError...
            raise CodecError(
                f"cannot decode {expected}: corrupt body: {type(exc).__name__}: {exc}"
            ) from None
        stream: io.BytesIO | None = self._payload.stream
        if stream is not None:
            left = len(stream.getbuffer()) - stream.tell()
            if left:
                raise CodecError(f"cannot decode {expected}: {left} bytes left after the body")
        if not isinstance(value, dict):
            raise CodecError(f"cannot decode {expected}: the bytes hold no record")
        return value

    def _writer_name(self, data: bytes) -> str | None:
        """The full name of the record ``data`` was written with (from the client's cache,
        which the failed read just filled); None when that cannot be told."""
        try:
            if data[:1] == CONFLUENT_MAGIC:
                schema = self.client.get_schema(_CONFLUENT_HEADER.unpack_from(data)[1])
            else:
                return None
            raw = json.loads(schema.schema_str or "null")
            parsed = fastavro.parse_schema(raw)
        except Exception:
            return None
        return parsed.get("name") if isinstance(parsed, dict) else None


def _schema_ref(data: bytes) -> str:
    if data[:1] == CONFLUENT_MAGIC and len(data) >= _CONFLUENT_HEADER.size:
        return f"schema id {_CONFLUENT_HEADER.unpack_from(data)[1]}"
    if data[:1] == _CONFLUENT_GUID_MAGIC and len(data) >= 17:
        return f"schema guid {bytes(data[1:17]).hex()}"
    return "schema"


class RegistrySettings(Protocol):
    """What `Codec.from_settings` reads of the settings object (infra/settings.py)."""

    schema_registry_url: str | None


class Codec:
    """Encodes and decodes tagstream records as Avro, with or without a schema registry.

    One instance per process is enough: schemas are parsed once and registry answers
    are cached (by confluent-kafka's client). The first encode of a record per topic
    (and the first decode of an unknown schema id) calls the registry synchronously,
    within ``timeout_s`` per request; ``registry_config`` adds settings of
    `SchemaRegistryClient` (``ssl.*``, ``max.retries``, ...).
    """

    def __init__(
        self,
        *,
        registry_url: str | None = None,
        timeout_s: float = 5.0,
        reader_schemas: Iterable[Mapping[str, Any]] = (),
        registry_config: Mapping[str, Any] | None = None,
    ) -> None:
        """``reader_schemas`` replace the shipped schema of the records they name: the
        codec then writes and reads with them (a newer deployment, evolution tests)."""
        self._current: dict[str, _Schema] = {}
        self._by_fingerprint: dict[bytes, _Schema] = {}
        for schema in _SHIPPED.values():
            self._add_current(schema)
        for raw in reader_schemas:
            self._add_current(_build_schema(raw, origin="reader schema"))
        for schema in _HISTORY:
            self._by_fingerprint.setdefault(schema.fingerprint, schema)
        self._registry = (
            _RegistryMode(registry_url, timeout_s=timeout_s, config=registry_config or {})
            if registry_url
            else None
        )

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Codec:
        """The codec the settings ask for: a registry when one is configured."""
        return cls(registry_url=settings.schema_registry_url)

    def __repr__(self) -> str:
        where = self._registry.base if self._registry else "single-object"
        return f"Codec({where}, records={len(RECORD_NAMES)})"

    def close(self) -> None:
        """Close the registry client's connections (the codec cannot reach it after)."""
        if self._registry is not None:
            self._registry.client.close()

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
        if self._registry is not None:
            return self._registry.encode(schema, value, topic)
        buffer = io.BytesIO()
        buffer.write(SINGLE_OBJECT_MARKER)
        buffer.write(schema.fingerprint)
        try:
            fastavro.schemaless_writer(buffer, schema.parsed, value)
        except Exception as exc:  # TypeError, ValueError, AttributeError... from the C writer
            raise CodecError(_misfit(schema, value, exc)) from exc
        return buffer.getvalue()

    # Decoding -----------------------------------------------------------------------

    def decode(self, record: str, data: bytes) -> dict[str, Any]:
        """The value of ``record`` in ``data``, in either wire format."""
        reader = self._schema(record, "decode")
        expected = reader.short_name
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"cannot decode {expected}: expected bytes, got {type(data).__name__}")
        if not data:
            raise CodecError(f"cannot decode {expected}: empty input")
        if data[:1] in (CONFLUENT_MAGIC, _CONFLUENT_GUID_MAGIC):
            if self._registry is None:
                if data[:1] == CONFLUENT_MAGIC and len(data) < _CONFLUENT_HEADER.size:
                    raise CodecError(
                        f"cannot decode {expected}: Confluent header truncated: {_preview(data)}"
                    )
                raise CodecError(
                    f"cannot decode {expected}: Confluent wire format ({_schema_ref(data)}) "
                    "but no schema registry is configured"
                )
            return self._registry.decode(reader, bytes(data))
        if data[:2] != SINGLE_OBJECT_MARKER:
            raise CodecError(
                f"cannot decode {expected}: unknown framing, starts {_preview(data)}; expected "
                "c3 01 (Avro single-object) or 00 (Confluent schema registry)"
            )
        if len(data) < _SINGLE_OBJECT_HEADER:
            raise CodecError(
                f"cannot decode {expected}: single-object header truncated: {_preview(data)}"
            )
        fp = bytes(data[2:_SINGLE_OBJECT_HEADER])
        writer = self._by_fingerprint.get(fp)
        if writer is None:
            raise CodecError(
                f"cannot decode {expected}: unknown schema fingerprint {fp.hex()}: "
                "not a shipped, released or registered writer schema"
            )
        if writer.name != reader.name and writer.name not in reader.aliases:
            raise CodecError(
                f"cannot decode {expected}: the bytes hold a {writer.short_name} record"
            )
        return _read_body(data, _SINGLE_OBJECT_HEADER, writer, reader)


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
