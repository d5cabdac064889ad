"""The published OpenAPI document, made to say what the service answers.

FastAPI derives the document from the routes but cannot see what the error handlers, the auth
dependency or the file responses send. This module declares that once, by rule, for every route
(a route added later gets the same): :func:`install` is the one line in ``api.main``.

- Every error (4xx, 5xx) is ``application/problem+json`` with the ``Problem`` schema, as
  ``api.errors`` sends it; FastAPI's own 422 schema (``HTTPValidationError``) is replaced.
- An operation that takes the API key: ``401``, and ``503`` (the key and everything else is read
  from the database). Its security is the bearer scheme, or nothing while the service runs open.
- A path parameter: ``404`` (an unknown id, or another tenant's). A ``cursor`` or
  ``Last-Event-ID`` parameter: ``400`` (one this service did not hand out); a body: ``400`` (one
  that cannot be parsed). An optional query or header parameter is absent or a string, never
  ``null`` (FastAPI declares ``anyOf [string, null]`` for ``str | None``).
- A multipart upload: ``400`` (a malformed body), ``413``, ``415``, ``422``, ``507``.
- A file download (a route that declares ``206``: Starlette's ``FileResponse``): ``200``/``206``
  with the file's media types, ``416`` and a malformed ``Range``'s ``400`` (Starlette's plain
  text), ``410`` (a row whose file is gone).
- Examples on the request bodies in ``_BODY_EXAMPLES``.

What only one route answers (a 409, a 429, a 304) stays declared on that route (``responses=``);
its body is made a problem document here like every other error.
"""

from __future__ import annotations

import copy
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.constants import REF_TEMPLATE
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from api.errors import PROBLEM_JSON
from api.schemas import EventList, Problem, StreamEventOut, StreamProgressOut
from shears.auth import KeyResolver

log = structlog.get_logger("shears.api")

SECURITY_SCHEME = "HTTPBearer"  # the name FastAPI gives api.deps' HTTPBearer
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_DESCRIPTIONS = {
    400: "Malformed request: a cursor this service did not hand out, or a malformed body.",
    401: "The API key is missing, unknown or revoked (only once any key exists).",
    404: "No such resource for this tenant (another tenant's id answers the same).",
    409: "The resource's state forbids this now.",
    410: "The record exists but its file is gone.",
    413: "Too large (`SHEARS_MAX_UPLOAD_BYTES`, or the storage quota).",
    415: "A file format Shears does not accept (pickles, TorchScript, ...), or a body that is not "
    "multipart.",
    416: "The `Range` cannot be satisfied.",
    422: "Well formed, but invalid values (every invalid field is in `errors`), or a malformed "
    "file of an accepted format.",
    429: "Too many queued jobs for this tenant; retry after `Retry-After` seconds.",
    503: "The database cannot be reached; retry after `Retry-After` seconds.",
    507: "Storage failed to keep the file.",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait.",
        "required": True,
        "schema": {"type": "integer"},
    },
}
_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}
_UPLOAD_ERRORS = (400, 413, 415, 422, 507)
# What api/routes/artifacts.py serves, by artifact format; anything else is octet-stream.
_FILE_TYPES = ("application/octet-stream", "application/zip", "application/json")
_BINARY = {"schema": {"type": "string", "format": "binary"}}

_MODEL_ID = "mdl_4f0c2a9e5b7d4c1e8a6b3d2f1e0c9b8a"
_DATASET_ID = "dst_9a8b7c6d5e4f4a3b2c1d0e9f8a7b6c5d"
_BODY_EXAMPLES: dict[str, dict[str, Any]] = {
    "JobCreate": {
        "unstructured": {
            "summary": "80% of all conv/linear weights by one global L1 ranking",
            "value": {
                "model_id": _MODEL_ID,
                "pruning": {
                    "criterion": "l1",
                    "granularity": "unstructured",
                    "sparsity": 0.8,
                    "scope": "global",
                },
            },
        },
        "channels-fine-tuned": {
            "summary": "30% of channels, then 3 epochs of fine-tuning, scored before and after",
            "value": {
                "model_id": _MODEL_ID,
                "name": "resnet channels 30%",
                "pruning": {"criterion": "l2", "granularity": "channel", "sparsity": 0.3},
                "fine_tune": {"dataset_id": _DATASET_ID, "epochs": 3, "lr": 0.001},
                "evaluation": {"dataset_id": _DATASET_ID},
            },
        },
        "language-model-2-4": {
            "summary": "A language model (hf) at 2:4 sparsity by Wanda",
            "value": {
                "model_id": _MODEL_ID,
                "pruning": {"criterion": "wanda", "granularity": "n:m", "n_m": [2, 4]},
                "calibration": {"dataset_id": _DATASET_ID, "num_samples": 128, "seq_len": 512},
            },
        },
    },
}

# The events route's two forms: declared on the route itself (`responses=EVENTS_RESPONSES`).
EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A page of events as JSON; or, with `Accept: text/event-stream`, "
        "Server-Sent Events until the job's final event. Each stored event is one message "
        "(`id:` its id, `event:` its stage, `data:` a `StreamEventOut`); when the job's status "
        "or progress changes, a message `event: progress` (`data:` a `StreamProgressOut`, "
        "`id:` the last event's id, so that `Last-Event-ID` resumes after it); while nothing "
        "happens, a comment line keeps the connection open.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EventList"}},
            "text/event-stream": {
                # Before Open API 3.2 (itemSchema), `schema` of an event stream is one event's.
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {
                            "type": "string",
                            "description": "The stored event's stage, or `progress`.",
                        },
                        "id": {
                            "type": "string",
                            "pattern": "^[0-9]+$",
                            "description": "The last stored event's id (none before the first).",
                        },
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/StreamEventOut"},
                                    {"$ref": "#/components/schemas/StreamProgressOut"},
                                ]
                            },
                        },
                    },
                },
                "example": 'id: 7\nevent: fine_tuning\ndata: {"id":7,"at":"2026-12-03T08:00:00Z",'
                '"stage":"fine_tuning","message":"epoch 1/3","data":{"loss":0.42}}\n\n'
                'id: 7\nevent: progress\ndata: {"status":"running","stage":"fine_tuning",'
                '"fraction":0.41}\n\n',
            },
        },
    },
    204: {
        "description": "`text/event-stream` resumed after the job's final event: nothing more "
        "will come (an `EventSource` stops reconnecting)."
    },
}
_STREAM_MODELS = (EventList, StreamEventOut, StreamProgressOut)

# Answers that are a route's own JSON, not problem documents: readiness says which check failed.
_READINESS = {
    "schema": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unready"]},
            "checks": {
                "type": "object",
                "description": "database, broker, storage: `ok`, or why not.",
                "additionalProperties": {"type": "string"},
            },
        },
    }
}
_OWN_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/readyz", "get"): {
        "200": {"description": "Ready.", "content": {"application/json": _READINESS}},
        "503": {
            "description": "Not ready: a check failed.",
            "content": {"application/json": _READINESS},
        },
    },
}


def _problem(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS.get(status, "An error."),
        "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
    }
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


def _is_default_error(response: dict[str, Any]) -> bool:
    """A response FastAPI filled in (``responses={409: {}}``, its 422): no body of the route's."""
    content = response.get("content")
    if not content:
        return True
    schemas = [media.get("schema", {}) for media in content.values()]
    return all(
        not schema or schema.get("$ref", "").endswith("/HTTPValidationError") for schema in schemas
    )


def _operation_errors(op: dict[str, Any], file_download: bool) -> dict[int, dict[str, Any]]:
    """The error responses the rules give ``op``."""
    params = op.get("parameters", [])
    names = {p["name"].lower() for p in params}
    errors: dict[int, dict[str, Any]] = {}
    if op.get("security"):
        errors[401] = _problem(401)
        errors[503] = _problem(503)
    if any(p["in"] == "path" for p in params):
        errors[404] = _problem(404)
    if names & {"cursor", "last-event-id"} or "requestBody" in op:
        errors[400] = _problem(400)  # also a body that cannot be read (not UTF-8 JSON, say)
    if "multipart/form-data" in op.get("requestBody", {}).get("content", {}):
        errors.update({status: _problem(status) for status in _UPLOAD_ERRORS})
    if file_download:
        errors[410] = _problem(410)
        range_ = {"Content-Range": {"schema": {"type": "string"}, "required": True}}
        errors[416] = {
            "description": _DESCRIPTIONS[416],
            "headers": range_,
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
        errors[400] = {
            "description": "A malformed `Range` (plain text), or a malformed request.",
            "content": {"text/plain": {"schema": {"type": "string"}}, **_problem(400)["content"]},
        }
    return errors


def _shape_file_download(op: dict[str, Any]) -> None:
    """``FileResponse`` routes: the whole file (200) or a range of it (206)."""
    whole: dict[str, Any] = {media: _BINARY for media in _FILE_TYPES}
    whole["application/json"] = {"schema": {"type": "object", "description": "A report."}}
    op["responses"]["200"] = {"description": "The file.", "content": whole}
    op["responses"]["206"] = {
        "description": "The requested `Range` (several ranges: `multipart/byteranges`).",
        "headers": {"Content-Range": {"schema": {"type": "string"}}},
        "content": {**whole, "multipart/byteranges": _BINARY},
    }
    params = op.setdefault("parameters", [])
    for name, description in (
        ("Range", "`bytes=START-[END]`: only that part of the file (206)."),
        ("If-Range", "The `ETag` of the file this range continues; another file comes whole."),
    ):
        params.append(
            {"name": name, "in": "header", "required": False, "description": description}
            | {"schema": {"type": "string"}}
        )


def _not_null(parameter: dict[str, Any]) -> None:
    """``str | None`` as a query or header parameter: on the wire it is absent or a string."""
    schema = parameter.get("schema", {})
    variants = [v for v in schema.get("anyOf", ()) if v.get("type") != "null"]
    if "anyOf" in schema and len(variants) == 1:
        del schema["anyOf"]
        schema.update(variants[0])


def _add_components(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (Problem, *_STREAM_MODELS):
        generated = model.model_json_schema(ref_template=REF_TEMPLATE)
        components.update(generated.pop("$defs", {}))
        components.setdefault(model.__name__, generated)
    used = str(schema["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if f"/{name}'" not in used:
            components.pop(name, None)


def shape(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of FastAPI's document, with what the rules above declare."""
    schema = copy.deepcopy(schema)
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            own = copy.deepcopy(_OWN_BODIES.get((path, method), {}))
            op.setdefault("responses", {}).update(own)
            # A route that declares 206 serves a file with Range (a FileResponse).
            download = "206" in op.get("responses", {})
            if download:
                _shape_file_download(op)
            for parameter in op.get("parameters", []):
                _not_null(parameter)
            responses = op.setdefault("responses", {})
            for status, response in _operation_errors(op, download).items():
                current = responses.get(str(status))
                if current is None or _is_default_error(current):
                    responses[str(status)] = response
            for status, response in responses.items():
                if status[0] in "45" and _is_default_error(response):
                    responses[status] = _problem(int(status))
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                ref = body.get("schema", {}).get("$ref", "")
                examples = _BODY_EXAMPLES.get(ref.rpartition("/")[2])
                if examples:
                    body["examples"] = examples
    _add_components(schema)
    scheme = schema["components"]["securitySchemes"][SECURITY_SCHEME]
    scheme["description"] = (
        "An API key: `Authorization: Bearer shk_...`. Required on every /v1 route once any key "
        "exists (`SHEARS_API_KEYS`, or `shears keys create`); while none does, the service runs "
        "open and operations list no credentials as an alternative."
    )
    return schema


def _with_security(schema: dict[str, Any], auth_enabled: bool) -> dict[str, Any]:
    """Operations that take the key need it once any key exists; while none does, no
    credentials is an alternative (``{}``), as the service then runs open."""
    requirement: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
    if not auth_enabled:
        requirement.append({})
    schema = dict(schema, paths=copy.deepcopy(schema["paths"]))
    for operations in schema["paths"].values():
        for op in operations.values():
            if op.get("security"):
                op["security"] = requirement
    return schema


def _auth_enabled(app: FastAPI) -> bool:
    keys: KeyResolver = app.state.keys
    if keys.env_keys:
        return True
    try:
        with app.state.sessions() as session:
            return keys.auth_enabled(session)  # remembered for a second; one query otherwise
    except SQLAlchemyError:
        log.warning("openapi: cannot tell whether keys exist; auth declared optional")
        return False


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this request's path (Starlette's own 405 names only
    the first route whose path matched)."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in app.router.routes
        )
    ]


def install(app: FastAPI) -> None:
    """Publish the shaped document at ``app.openapi_url``, and answer 405 with every allowed
    method in ``Allow``, as the document lists them."""
    shaped: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if not shaped:
            shaped.update(shape(FastAPI.openapi(app)))
        return shaped

    def openapi() -> dict[str, Any]:
        return _with_security(document(), _auth_enabled(app))

    async def openapi_json(request: Request) -> JSONResponse:
        # Whether any key exists may take a query: in a worker thread, not on the event loop.
        enabled = await run_in_threadpool(_auth_enabled, app)
        return JSONResponse(_with_security(document(), enabled))

    app.openapi = openapi  # type: ignore[method-assign]
    if app.openapi_url:
        app.router.routes[:] = [
            Route(app.openapi_url, openapi_json, include_in_schema=False)
            if isinstance(route, Route) and route.path == app.openapi_url
            else route
            for route in app.router.routes
        ]

    http_error = app.exception_handlers.get(StarletteHTTPException)
    assert http_error is not None, "install api.errors' handlers first"

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        response = http_error(request, exc)
        if not isinstance(response, Response):
            response = await response
        response.headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return response

    app.add_exception_handler(405, method_not_allowed)
