"""What a finished job answers: its metrics and layers in the shapes core declares them
(``core.pipeline.Metrics``, ``LayerResult``), and a published schema that says what each is."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

from core.pipeline import LayerResult, Metrics
from tests.api.conftest import Api, upload
from tests.api.rows import LAYERS, METRICS, finished_job


def test_a_finished_jobs_metrics_and_layers(api: Api, resnet_pt2: Path) -> None:
    model = upload(api.client, resnet_pt2)
    job_id = finished_job(api.sessions, api.storage, "default", model["id"])
    job = api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["metrics"] == asdict(METRICS)  # every field, as the worker stored it
    assert job["metrics"]["eval_before"]["top_k_accuracy"] == 0.99  # extra scores kept
    assert [j["metrics"] for j in api.client.get("/v1/jobs").json()["items"] if j["id"] == job_id]
    layers = api.client.get(f"/v1/jobs/{job_id}/layers").json()["items"]
    assert [
        LayerResult(
            **{
                **layer,
                "shape_before": tuple(layer["shape_before"]),
                "shape_after": tuple(layer["shape_after"]),
            }
        )
        for layer in layers
    ] == list(LAYERS)

    failed = finished_job(api.sessions, api.storage, "default", model["id"], status="failed")
    body = api.client.get(f"/v1/jobs/{failed}").json()
    assert body["error"] == {"type": "pruning_failed", "message": "it broke"}
    assert set(body["metrics"]) == {f.name for f in fields(Metrics)}
    assert all(value is None for value in body["metrics"].values())
    assert api.client.get(f"/v1/jobs/{failed}/layers").json() == {"items": []}


def test_the_schema_describes_metrics_layers_and_uploads(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    metrics, layer = components["MetricsOut"], components["LayerOut"]
    assert set(metrics["properties"]) == {f.name for f in fields(Metrics)}
    assert "required" not in metrics  # each null until measured
    assert set(layer["properties"]) == {f.name for f in fields(LayerResult)}
    assert set(layer["required"]) == {f.name for f in fields(LayerResult)}
    for model in (metrics, layer):
        assert all(p.get("description") for p in model["properties"].values()), model
    assert "/v1/jobs" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    # n:m fills `sparsity` in, so the published schema must not make clients send it.
    assert set(components["PruningSpec"]["required"]) == {"criterion", "granularity"}
    assert set(components["JobCreate"]["required"]) == {"model_id", "pruning"}
    assert api.client.get("/docs").status_code == 200
