"""A local Confluent schema registry for the tests: the REST API the stock client uses.

Real HTTP on loopback (aiohttp, started by `serve_locally` on a `BackgroundLoop`), in
memory, following Confluent's REST API closely enough for confluent-kafka's own
`SchemaRegistryClient`, `AvroSerializer` and `AvroDeserializer`:

- ``POST /subjects/{s}/versions`` registers (one id per distinct schema, shared by
  subjects as upstream; a new version only when the schema is new to the subject), after
  a compatibility check against the subject's versions at the subject's or the global
  level; an incompatible schema gets 409, an unparsable one 422 (error code 42201);
- ``POST /subjects/{s}`` looks a schema up in a subject;
- ``GET /schemas/ids/{id}``, ``GET /subjects``, ``GET /subjects/{s}/versions`` and
  ``GET /subjects/{s}/versions/{version|latest}``;
- ``POST /compatibility/subjects/{s}/versions/{version|latest}`` and
  ``POST /compatibility/subjects/{s}/versions`` (``verbose`` adds the reasons);
- ``GET|PUT /config`` and ``GET|PUT|DELETE /config/{s}`` (default level BACKWARD, as
  upstream);
- anything else, the associations API included, answers 404 as a registry without it
  does (the stock serdes then fall back to the topic subject-name strategy).

Compatibility is judged by Apache Avro's own checker (``avro.compatibility``), not by
schemas/evolution.py, so the registry and our checker are independent opinions.
"""

from __future__ import annotations

import json
from typing import Any

import avro.schema
from aiohttp import web
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from tests.helpers import BackgroundLoop, serve_locally

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)


def _answer(status: int, body: Any) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type=CONTENT_TYPE)


def _error(status: int, code: int, message: str) -> web.Response:
    return _answer(status, {"error_code": code, "message": message})


class FakeSchemaRegistry:
    """The registry's state, its HTTP server, and the requests it answered."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}  # normalised schema text -> id
        self.schemas: dict[int, str] = {}  # id -> schema text as first registered
        self.subjects: dict[str, list[int]] = {}  # subject -> schema id of each version
        self.global_level = "BACKWARD"
        self.subject_levels: dict[str, str] = {}
        # (method, path, query, headers) of every request, for tests of caching and auth
        self.requests: list[tuple[str, str, dict[str, str], dict[str, str]]] = []
        # While set, every request is answered with this status (an outage: 503, 429, ...).
        self.down_with: int | None = None
        self._background: BackgroundLoop | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # Server --------------------------------------------------------------------------

    def start(self) -> FakeSchemaRegistry:
        app = web.Application(middlewares=[self._record])
        app.add_routes(
            [
                web.post("/subjects/{subject}/versions", self.register),
                web.post("/subjects/{subject}", self.lookup),
                web.get("/subjects", self.list_subjects),
                web.get("/subjects/{subject}/versions", self.list_versions),
                web.get("/subjects/{subject}/versions/{version}", self.get_version),
                web.get("/schemas/ids/{id}", self.get_by_id),
                web.post("/compatibility/subjects/{subject}/versions/{version}", self.compatible),
                web.post("/compatibility/subjects/{subject}/versions", self.compatible_all),
                web.get("/config", self.get_global_config),
                web.put("/config", self.put_global_config),
                web.get("/config/{subject}", self.get_config),
                web.put("/config/{subject}", self.put_config),
                web.delete("/config/{subject}", self.delete_config),
            ]
        )
        self._background = BackgroundLoop()
        self._runner, self.url = self._background.run(serve_locally(app))
        return self

    def close(self) -> None:
        if self._background is not None:
            if self._runner is not None:
                self._background.run(self._runner.cleanup())
            self._background.close()
            self._background = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            (request.method, request.path, dict(request.query), dict(request.headers))
        )
        if self.down_with is not None:
            return _error(self.down_with, self.down_with, "the registry is unavailable")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _error(404, 404, "HTTP 404 Not Found")
        except web.HTTPMethodNotAllowed:
            return _error(405, 405, "HTTP 405 Method Not Allowed")

    def requests_of(self, method: str) -> list[str]:
        """The paths of the requests with ``method``, in order."""
        return [path for m, path, _, _ in self.requests if m == method]

    # State ---------------------------------------------------------------------------

    def level(self, subject: str) -> str:
        return self.subject_levels.get(subject, self.global_level)

    def version_body(self, subject: str, version: int) -> dict[str, Any]:
        schema_id = self.subjects[subject][version - 1]
        return {
            "subject": subject,
            "id": schema_id,
            "version": version,
            "schema": self.schemas[schema_id],
        }

    def incompatibilities(self, subject: str, text: str, *, against: str = "level") -> list[str]:
        """Why ``text`` may not join ``subject`` at its level (empty: it may)."""
        level = self.level(subject)
        versions = self.subjects.get(subject, [])
        if level == "NONE" or not versions:
            return []
        transitive = level.endswith("_TRANSITIVE") or against == "all"
        others = versions if transitive else versions[-1:]
        candidate = avro.schema.parse(text)
        checker = ReaderWriterCompatibilityChecker()
        reasons: list[str] = []
        for schema_id in others:
            existing = avro.schema.parse(self.schemas[schema_id])
            pairs = []
            if level.startswith(("BACKWARD", "FULL")):
                pairs.append(("new reader, old writer", candidate, existing))
            if level.startswith(("FORWARD", "FULL")):
                pairs.append(("old reader, new writer", existing, candidate))
            for what, reader, writer in pairs:
                result = checker.get_compatibility(reader, writer)
                if result.compatibility is not SchemaCompatibilityType.compatible:
                    reasons.extend(
                        f"{what} (schema id {schema_id}): {message}"
                        for message in sorted(result.messages)
                    )
        return reasons

    # Handlers ------------------------------------------------------------------------

    @staticmethod
    async def _schema_text(request: web.Request) -> tuple[str | None, web.Response | None]:
        try:
            body = await request.json()
            text = body["schema"]
            if body.get("schemaType", "AVRO") != "AVRO":
                return None, _error(422, 42201, "Only AVRO schemas are supported here")
            avro.schema.parse(text)
        except Exception as exc:  # a real registry rejects what does not parse
            return None, _error(422, 42201, f"Invalid schema: {exc}")
        return text, None

    @staticmethod
    def _key(text: str) -> str:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))

    async def register(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        text, refusal = await self._schema_text(request)
        if refusal is not None or text is None:
            return refusal or _error(422, 42201, "Invalid schema")
        key = self._key(text)
        versions = self.subjects.setdefault(subject, [])
        known = self.ids.get(key)
        if known is not None and known in versions:
            return _answer(200, {"id": known})
        reasons = self.incompatibilities(subject, text)
        if reasons:
            if not versions:
                del self.subjects[subject]
            return _error(
                409,
                409,
                f'Schema being registered is incompatible with an earlier schema for subject "'
                f'{subject}", details: {reasons}',
            )
        schema_id = known if known is not None else len(self.ids) + 1
        self.ids[key] = schema_id
        self.schemas.setdefault(schema_id, text)
        versions.append(schema_id)
        return _answer(200, {"id": schema_id})

    async def lookup(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject not in self.subjects:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        text, refusal = await self._schema_text(request)
        if refusal is not None or text is None:
            return refusal or _error(422, 42201, "Invalid schema")
        schema_id = self.ids.get(self._key(text))
        versions = self.subjects[subject]
        if schema_id is None or schema_id not in versions:
            return _error(404, 40403, "Schema not found")
        return _answer(200, self.version_body(subject, versions.index(schema_id) + 1))

    async def list_subjects(self, request: web.Request) -> web.Response:
        return _answer(200, sorted(self.subjects))

    async def list_versions(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject not in self.subjects:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        return _answer(200, list(range(1, len(self.subjects[subject]) + 1)))

    def _version(self, subject: str, version: str) -> int | web.Response:
        if subject not in self.subjects:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        count = len(self.subjects[subject])
        number = count if version in ("latest", "-1") else int(version) if version.isdigit() else 0
        if not 1 <= number <= count:
            return _error(404, 40402, f"Version {version} not found.")
        return number

    async def get_version(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        number = self._version(subject, request.match_info["version"])
        if isinstance(number, web.Response):
            return number
        return _answer(200, self.version_body(subject, number))

    async def get_by_id(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        text = self.schemas.get(int(raw)) if raw.isdigit() else None
        if text is None:
            return _error(404, 40403, f"Schema {raw} not found")
        return _answer(200, {"schema": text})

    async def _compatibility(self, request: web.Request, *, against: str) -> web.Response:
        subject = request.match_info["subject"]
        text, refusal = await self._schema_text(request)
        if refusal is not None or text is None:
            return refusal or _error(422, 42201, "Invalid schema")
        if against == "version":
            version = request.match_info["version"]
            if subject in self.subjects:
                number = self._version(subject, version)
                if isinstance(number, web.Response):
                    return number
        reasons = self.incompatibilities(subject, text, against=against)
        body: dict[str, Any] = {"is_compatible": not reasons}
        if request.query.get("verbose", "").lower() == "true":
            body["messages"] = reasons
        return _answer(200, body)

    async def compatible(self, request: web.Request) -> web.Response:
        return await self._compatibility(request, against="version")

    async def compatible_all(self, request: web.Request) -> web.Response:
        return await self._compatibility(request, against="all")

    async def get_global_config(self, request: web.Request) -> web.Response:
        return _answer(200, {"compatibilityLevel": self.global_level})

    async def _level(self, request: web.Request) -> str | web.Response:
        body = await request.json()
        level = str(body.get("compatibility", "")).upper()
        if level not in LEVELS:
            return _error(422, 42203, f"Invalid compatibility level {level!r}")
        return level

    async def put_global_config(self, request: web.Request) -> web.Response:
        level = await self._level(request)
        if isinstance(level, web.Response):
            return level
        self.global_level = level
        return _answer(200, {"compatibility": level})

    async def get_config(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject in self.subject_levels:
            return _answer(200, {"compatibilityLevel": self.subject_levels[subject]})
        if request.query.get("defaultToGlobal", "").lower() == "true":
            return _answer(200, {"compatibilityLevel": self.global_level})
        return _error(
            404,
            40408,
            f"Subject '{subject}' does not have subject-level compatibility configured",
        )

    async def put_config(self, request: web.Request) -> web.Response:
        level = await self._level(request)
        if isinstance(level, web.Response):
            return level
        self.subject_levels[request.match_info["subject"]] = level
        return _answer(200, {"compatibility": level})

    async def delete_config(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        previous = self.subject_levels.pop(subject, self.global_level)
        return _answer(200, {"compatibilityLevel": previous})
