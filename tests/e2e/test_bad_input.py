"""Bad input gets a clear 4xx problem+json and leaves nothing behind."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from tests.e2e.service import Service
from tests.factories import malicious_pickle, replace_member, resnet_module

pytestmark = pytest.mark.e2e


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


def stored_files(service: Service) -> set[Path]:
    return {p for p in service.storage_dir.rglob("*") if p.is_file() and ".probe" not in p.name}


def post_file(service: Service, content: bytes, filename: str = "model.pt2"):
    return service.client.post("/v1/models", files={"file": (filename, io.BytesIO(content))})


def test_crafted_pt2_is_refused_and_runs_nothing(
    service: Service, resnet_pt2: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    crafted = replace_member(
        resnet_pt2, tmp_path / "crafted.pt2", "sample_inputs/model.pt", malicious_pickle(canary)
    )
    before = stored_files(service)
    body = assert_problem(post_file(service, crafted.read_bytes()), 422, "unsafe-archive")
    assert "sample_inputs" in body["detail"]
    assert not canary.exists()
    assert stored_files(service) == before
    assert service.client.get("/v1/models", params={"limit": 200}).status_code == 200


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_save_module", "torchscript", "garbage"])
def test_formats_other_than_torch_export_get_415_with_a_hint(
    service: Service, tmp_path: Path, kind: str
) -> None:
    canary = tmp_path / "canary"
    if kind == "raw_pickle":
        content = malicious_pickle(canary)
    elif kind == "torch_save_module":
        buffer = io.BytesIO()
        torch.save(resnet_module(), buffer)
        content = buffer.getvalue()
    elif kind == "torchscript":
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(resnet_module()), buffer)
        content = buffer.getvalue()
    else:
        content = b"\x00\x01 definitely not a model" * 10
    before = stored_files(service)
    body = assert_problem(post_file(service, content), 415, "unsupported-format")
    assert "torch.export" in body["detail"]
    assert not canary.exists()
    assert stored_files(service) == before


def test_upload_limits_and_form_errors(service: Service) -> None:
    before = stored_files(service)
    too_big = b"\0" * (4 * 1024 * 1024 + 1)
    assert_problem(post_file(service, too_big), 413, "payload-too-large")
    body = assert_problem(
        service.client.post("/v1/models", files={"other": ("x", b"abc")}), 422, "validation-error"
    )
    assert body["errors"][0]["loc"] == ["body", "file"]
    assert_problem(
        service.client.post(
            "/v1/models", content=b"{}", headers={"content-type": "application/json"}
        ),
        415,
        "unsupported-media-type",
    )
    assert stored_files(service) == before


def test_job_validation(service: Service, resnet_pt2: Path) -> None:
    with resnet_pt2.open("rb") as f:
        model = service.client.post("/v1/models", files={"file": ("r.pt2", f)}).json()
    good = {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5}
    jobs_before = service.client.get("/v1/jobs", params={"limit": 200}).json()["items"]

    assert_problem(
        service.client.post("/v1/jobs", json={"model_id": "mdl_nope", "pruning": good}),
        404,
        "not-found",
    )
    cases = [
        ({**good, "sparsity": 1.5}, ["body", "pruning", "sparsity"]),
        ({**good, "criterion": "magic"}, ["body", "pruning", "criterion"]),
        ({**good, "granularity": "diagonal"}, ["body", "pruning", "granularity"]),
        ({**good, "surprise": 1}, ["body", "pruning", "surprise"]),
        ({**good, "criterion": "lp"}, ["body", "pruning"]),
        ({**good, "criterion": "bn_scale"}, ["body", "pruning"]),
        ({**good, "granularity": "n:m", "n_m": [4, 2]}, ["body", "pruning"]),
    ]
    for pruning, loc in cases:
        body = assert_problem(
            service.client.post("/v1/jobs", json={"model_id": model["id"], "pruning": pruning}),
            422,
            "validation-error",
        )
        assert body["errors"][0]["loc"] == loc, body

    body = assert_problem(
        service.client.post(
            "/v1/jobs",
            json={"model_id": model["id"], "pruning": {**good, "exclude": ["classifier"]}},
        ),
        422,
        "validation-error",
    )
    assert "classifier" in body["detail"]
    assert "stage1.c1" in body["detail"]
    body = assert_problem(
        service.client.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "pruning": {**good, "scope": "global", "sparsity": 0.9, "max_layer_sparsity": 0.5},
            },
        ),
        422,
        "validation-error",
    )
    assert "max_layer_sparsity" in body["detail"]
    channel = {"criterion": "apoz", "granularity": "channel", "sparsity": 0.5}
    body = assert_problem(
        service.client.post("/v1/jobs", json={"model_id": model["id"], "pruning": channel}),
        422,
        "validation-error",
    )
    assert "calibration" in body["detail"]
    malformed = service.client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code in (400, 422)
    assert malformed.headers["content-type"] == "application/problem+json"

    assert service.client.get("/v1/jobs", params={"limit": 200}).json()["items"] == jobs_before
    assert_problem(service.client.get("/v1/jobs/job_nope"), 404, "not-found")
    assert_problem(service.client.get("/v1/artifacts/art_nope/download"), 404, "not-found")
    assert_problem(service.client.get("/v1/jobs", params={"cursor": "%%%"}), 400, "invalid-cursor")


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
