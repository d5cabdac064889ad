"""Health and docs on the real processes. Bad input (refused uploads, invalid jobs) is tested in
process, in tests/api: it needs no worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.service import Service

pytestmark = pytest.mark.e2e


def stored_files(service: Service) -> set[Path]:
    return {p for p in service.storage_dir.rglob("*") if p.is_file() and ".probe" not in p.name}


def test_health_and_docs(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    schema = service.client.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    # n:m fills `sparsity` in, so the published schema must not make clients send it.
    pruning = schema["components"]["schemas"]["PruningSpec"]
    assert set(pruning["required"]) == {"criterion", "granularity"}
    assert service.client.get("/docs").status_code == 200
