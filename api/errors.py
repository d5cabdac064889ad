"""Every error leaves the API as RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.services.errors import (
    Conflict,
    Gone,
    IdempotencyMismatch,
    InvalidField,
    NotFound,
    QueueFull,
    ServiceError,
)
from core.errors import (
    DatasetMismatch,
    InvalidArchive,
    InvalidDataset,
    InvalidSpec,
    ShearsError,
    UnsafeArchive,
    UnsupportedFormat,
)
from shears.db.repository import InvalidCursor
from shears.storage import StorageError, StorageQuotaExceeded

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("shears.api")


class Problem(Exception):
    """An error with its HTTP status, a stable type slug and a sentence a person can act on."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers


def invalid_field(loc: list[str | int], message: str) -> Problem:
    """A 422 for one field of a well-formed request whose value cannot work."""
    return Problem(
        422,
        "validation-error",
        "Invalid request",
        message,
        errors=[{"loc": loc, "msg": message, "type": "value_error"}],
    )


# core's errors, as the API reports them.
_CORE_ERRORS: dict[type[ShearsError], tuple[int, str, str]] = {
    UnsupportedFormat: (415, "unsupported-format", "Unsupported model format"),
    UnsafeArchive: (422, "unsafe-archive", "Unsafe archive refused"),
    InvalidArchive: (422, "invalid-archive", "Malformed archive"),
    InvalidSpec: (422, "invalid-spec", "The spec does not fit this model"),
    InvalidDataset: (422, "invalid-dataset", "Malformed dataset"),
    DatasetMismatch: (422, "dataset-mismatch", "The dataset does not fit"),
}


def from_core(exc: ShearsError) -> Problem:
    for cls in type(exc).__mro__:
        if cls in _CORE_ERRORS:
            status, slug, title = _CORE_ERRORS[cls]
            return Problem(status, slug, title, exc.message)
    return Problem(422, exc.code.replace("_", "-"), "Request refused", exc.message)


def from_service(exc: ServiceError) -> Problem:
    """The one mapping of the service's refusals to problem details."""
    match exc:
        case NotFound():
            return Problem(404, "not-found", "Not found", exc.message)
        case InvalidField():
            return invalid_field(["body", *exc.field], exc.message)
        case Conflict():
            return Problem(409, exc.reason, exc.title, exc.message)
        case QueueFull():
            return Problem(
                429,
                "too-many-queued-jobs",
                "Too many queued jobs",
                exc.message,
                headers={"Retry-After": str(exc.retry_after)},
            )
        case IdempotencyMismatch():
            return Problem(422, "idempotency-key-reused", "Idempotency-Key reused", exc.message)
        case Gone():
            return Problem(410, f"{exc.what}-gone", f"{exc.what.capitalize()} gone", exc.message)
    return Problem(422, "request-refused", "Request refused", exc.message)


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{problem.slug}",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if instance:
        body["instance"] = instance
    if problem.errors is not None:
        body["errors"] = problem.errors
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers
    )


_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return problem_response(from_service(exc), request.url.path)

    @app.exception_handler(ShearsError)
    async def _core(request: Request, exc: ShearsError) -> JSONResponse:
        return problem_response(from_core(exc), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "request"
        detail = f"{where}: {first['msg']}" + (
            f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        )
        problem = Problem(422, "validation-error", "Invalid request", detail, errors=errors)
        return problem_response(problem, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
        headers = dict(exc.headers) if exc.headers else None
        problem = Problem(exc.status_code, slug, title, str(exc.detail), headers=headers)
        return problem_response(problem, request.url.path)

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable", error=str(exc.orig))
        problem = Problem(
            503,
            "database-unavailable",
            "Database unavailable",
            "The database cannot be reached right now; retry in a few seconds.",
            headers={"Retry-After": "5"},
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return await _database_down(request, exc)  # type: ignore[arg-type]
        log.exception("database error")
        problem = Problem(500, "internal-error", "Internal error", "The request failed.")
        return problem_response(problem, request.url.path)

    @app.exception_handler(InvalidCursor)
    async def _cursor(request: Request, exc: InvalidCursor) -> JSONResponse:
        problem = Problem(
            400,
            "invalid-cursor",
            "Invalid cursor",
            "Pass back the next_cursor of the previous page.",
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(StorageQuotaExceeded)
    async def _quota(request: Request, exc: StorageQuotaExceeded) -> JSONResponse:
        problem = Problem(413, "storage-quota-exceeded", "Storage quota exceeded", str(exc))
        return problem_response(problem, request.url.path)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage failure", error=str(exc))
        problem = Problem(
            507, "storage-error", "Storage unavailable", f"The file could not be stored: {exc}"
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        problem = Problem(
            500, "internal-error", "Internal error", "The request failed unexpectedly."
        )
        return problem_response(problem, request.url.path)
