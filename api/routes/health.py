"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import CeleryDep, SessionDep, StorageDep

router = APIRouter(tags=["health"])
log = structlog.get_logger("shears.api")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {}})
def readyz(session: SessionDep, storage: StorageDep, celery: CeleryDep) -> JSONResponse:
    """200 when the database, the broker and storage all answer; 503 and which failed otherwise."""
    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    checks["storage"] = "ok" if storage.healthy() else "unavailable"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unready", "checks": checks},
        status_code=200 if ready else 503,
    )
