"""The README's walk-through through real processes: upload, prune at 80% global L1, download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from core.formats.pt2.program import load_program
from tests.bodies import global_l1
from tests.e2e.service import Service
from tests.factories import PRUNABLE, export_resnet, resnet_module

pytestmark = pytest.mark.e2e


def upload(
    service: Service, path: Path, name: str | None = None, collection: str = "models"
) -> dict:
    data = {"name": name} if name else {}
    with path.open("rb") as f:
        response = service.client.post(
            f"/v1/{collection}", files={"file": (path.name, f)}, data=data
        )
    assert response.status_code == 201, response.text
    return response.json()


def submit(service: Service, body: dict) -> dict:
    response = service.client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def test_upload_reads_metadata_without_loading(service: Service, resnet_pt2: Path) -> None:
    model = upload(service, resnet_pt2, name="resnet")
    reference = resnet_module()
    assert model["format"] == "pt2"
    assert model["name"] == "resnet"
    assert model["size_bytes"] == resnet_pt2.stat().st_size
    assert model["sha256"] == hashlib.sha256(resnet_pt2.read_bytes()).hexdigest()
    assert model["num_parameters"] == sum(p.numel() for p in reference.parameters())
    (x,) = model["inputs"]
    assert x["name"] == "x"
    assert x["dtype"] == "float32"
    assert x["shape"][1:] == [1, 8, 8]
    assert [d["dim"] for d in x["dynamic_dims"]] == [0]
    assert [layer["name"] for layer in model["prunable_layers"]] == PRUNABLE
    assert service.client.get(f"/v1/models/{model['id']}").json() == model


def test_global_l1_job_end_to_end(service: Service, resnet_pt2: Path, tmp_path: Path) -> None:
    model = upload(service, resnet_pt2)
    job = submit(service, global_l1(model["id"]))
    assert job["status"] in ("queued", "running")
    assert job["metrics"]["sparsity"] is None

    job = service.wait_for_job(job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["progress"] == {"stage": "done", "fraction": 1.0}
    metrics = job["metrics"]
    assert metrics["sparsity"] == pytest.approx(0.8, abs=0.005)
    assert metrics["params_before"] == metrics["params_after"] == model["num_parameters"]
    assert metrics["macs_before"] == metrics["macs_after"] > 0
    assert metrics["latency_ms_before"] > 0
    assert metrics["latency_ms_after"] > 0
    assert metrics["latency_batch_size"] == 32
    assert metrics["device"] == "cpu"
    assert metrics["sparse_size_bytes_after"] < metrics["size_bytes_before"]
    assert {a["kind"] for a in job["artifacts"]} == {"model", "weights", "report"}

    layers = service.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    assert [layer["name"] for layer in layers] == PRUNABLE
    total = sum(layer["params"] for layer in layers)
    zeros = sum(layer["params"] - layer["nonzero"] for layer in layers)
    assert zeros == round(0.8 * total)
    # One global ranking: layers end up pruned to different degrees.
    assert (
        max(layer["sparsity"] for layer in layers) - min(layer["sparsity"] for layer in layers)
        > 0.1
    )

    events = service.client.get(f"/v1/jobs/{job['id']}/events").json()["items"]
    stages = [e["stage"] for e in events]
    for stage in ("queued", "loading", "pruning", "exporting", "evaluating", "done"):
        assert stage in stages

    # Download the pruned program, check it independently of the service.
    (artifact,) = [a for a in job["artifacts"] if a["kind"] == "model"]
    response = service.client.get(artifact["download_url"])
    assert response.status_code == 200
    assert response.headers["content-length"] == str(artifact["size_bytes"])
    assert response.headers["etag"] == f'"{artifact["sha256"]}"'
    assert "attachment" in response.headers["content-disposition"]
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    pruned_path = tmp_path / "pruned.pt2"
    pruned_path.write_bytes(response.content)
    program, _ = load_program(pruned_path)
    weights = {
        n: t
        for n, t in program.state_dict.items()
        if n.removesuffix(".weight") in PRUNABLE and n.endswith(".weight")
    }
    zero_fraction = sum(int((w == 0).sum()) for w in weights.values()) / sum(
        w.numel() for w in weights.values()
    )
    assert zero_fraction == pytest.approx(0.8, abs=0.005)

    # It runs at a batch size never seen at export (4), and equals the original with those zeros.
    reference = resnet_module()
    with torch.no_grad():
        for name, w in weights.items():
            reference.get_parameter(name).mul_((w != 0).to(w.dtype))
        x = torch.randn(7, 1, 8, 8)
        torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-4, atol=1e-5)

    # The pruned program is a model of its own and can be pruned again.
    result = service.client.get(f"/v1/models/{job['result_model_id']}").json()
    assert result["source_job_id"] == job["id"]
    assert result["sha256"] == artifact["sha256"]
    again = service.wait_for_job(submit(service, global_l1(result["id"], 0.9))["id"])
    assert again["status"] == "succeeded", again["error"]
    assert again["metrics"]["sparsity"] == pytest.approx(0.9, abs=0.005)


def test_download_supports_ranges(service: Service, resnet_pt2: Path) -> None:
    job = service.wait_for_job(submit(service, global_l1(upload(service, resnet_pt2)["id"]))["id"])
    (report,) = [a for a in job["artifacts"] if a["kind"] == "report"]
    whole = service.client.get(report["download_url"]).content
    part = service.client.get(report["download_url"], headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == whole[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(whole)}"
    beyond = service.client.get(
        report["download_url"], headers={"Range": f"bytes={len(whole) + 5}-"}
    )
    assert beyond.status_code == 416


def test_dry_run_reports_and_writes_no_model(service: Service, resnet_pt2: Path) -> None:
    model = upload(service, resnet_pt2)
    job = service.wait_for_job(submit(service, {**global_l1(model["id"]), "dry_run": True})["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["dry_run"] is True
    assert [a["kind"] for a in job["artifacts"]] == ["report"]
    assert job["result_model_id"] is None
    assert job["metrics"]["sparsity"] == pytest.approx(0.8, abs=0.005)
    report = service.client.get(job["artifacts"][0]["download_url"]).json()
    assert report["dry_run"] is True
    assert len(report["layers"]) == len(PRUNABLE)


def test_layer_scope_overrides_and_exclude(service: Service, resnet_pt2: Path) -> None:
    model = upload(service, resnet_pt2)
    body = {
        "model_id": model["id"],
        "pruning": {
            "criterion": "random",
            "seed": 3,
            "granularity": "unstructured",
            "sparsity": 0.5,
            "layer_sparsity": {"stage2.*": 0.75},
            "exclude": ["head"],
        },
    }
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    layers = {
        x["name"]: x for x in service.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    }
    assert layers["head"]["nonzero"] == layers["head"]["params"]
    for name in ("stage2.c1", "stage2.c2"):
        assert layers[name]["params"] - layers[name]["nonzero"] == round(
            0.75 * layers[name]["params"]
        )
    assert layers["stem"]["params"] - layers["stem"]["nonzero"] == round(
        0.5 * layers["stem"]["params"]
    )


def test_a_failing_job_says_why_and_the_worker_runs_the_next(
    service: Service, resnet_pt2: Path, tmp_path: Path
) -> None:
    broken = upload(service, export_resnet(tmp_path / "broken.pt2", seed=1))
    # Damage the stored file behind the service's back (a disk fault): the worker's gate refuses it.
    stored = next(service.storage_dir.rglob(f"{broken['id']}.pt2"))
    stored.write_bytes(b"PK\x03\x04 not really a zip any more")
    failed = service.wait_for_job(submit(service, global_l1(broken["id"]))["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["type"] in ("invalid_archive", "unsupported_format")
    assert failed["error"]["message"]
    assert failed["artifacts"] == []
    assert failed["metrics"]["sparsity"] is None

    ok = service.wait_for_job(submit(service, global_l1(upload(service, resnet_pt2)["id"]))["id"])
    assert ok["status"] == "succeeded", ok["error"]


def test_list_filter_paginate_cancel_delete(service: Service, resnet_pt2: Path) -> None:
    model = upload(service, resnet_pt2)
    first = service.wait_for_job(submit(service, global_l1(model["id"], 0.5))["id"])
    second = service.wait_for_job(submit(service, global_l1(model["id"], 0.6))["id"])

    page = service.client.get("/v1/jobs", params={"model_id": model["id"], "limit": 1}).json()
    assert [j["id"] for j in page["items"]] == [second["id"]]  # newest first
    page2 = service.client.get(
        "/v1/jobs", params={"model_id": model["id"], "limit": 1, "cursor": page["next_cursor"]}
    ).json()
    assert [j["id"] for j in page2["items"]] == [first["id"]]
    assert page2["next_cursor"] is None
    succeeded = service.client.get("/v1/jobs", params={"status": "succeeded", "limit": 200}).json()
    assert all(j["status"] == "succeeded" for j in succeeded["items"])

    conflict = service.client.post(f"/v1/jobs/{first['id']}/cancel")
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"

    artifact_url = first["artifacts"][0]["download_url"]
    assert service.client.delete(f"/v1/jobs/{first['id']}").status_code == 204
    assert service.client.get(f"/v1/jobs/{first['id']}").status_code == 404
    assert service.client.get(artifact_url).status_code == 404

    assert service.client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert service.client.get(f"/v1/models/{model['id']}").status_code == 404
    # The job that used it still says which model it pruned.
    assert service.client.get(f"/v1/jobs/{second['id']}").json()["model_id"] == model["id"]


def test_channel_job_returns_a_smaller_program_that_prunes_again(
    service: Service, resnet_pt2: Path, tmp_path: Path
) -> None:
    model = upload(service, resnet_pt2)
    pruning = {"criterion": "l1", "granularity": "channel", "sparsity": 0.5}
    dry = service.wait_for_job(
        submit(service, {"model_id": model["id"], "pruning": pruning, "dry_run": True})["id"]
    )
    assert dry["status"] == "succeeded", dry["error"]
    assert dry["result_model_id"] is None

    job = service.wait_for_job(submit(service, {"model_id": model["id"], "pruning": pruning})["id"])
    assert job["status"] == "succeeded", job["error"]
    metrics = job["metrics"]
    assert metrics["params_after"] < 0.6 * metrics["params_before"]
    assert metrics["macs_after"] < metrics["macs_before"]
    layers = {
        row["name"]: row
        for row in service.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    }
    assert layers["stem"]["shape_before"] == [8, 1, 3, 3]
    assert layers["stem"]["shape_after"] == [4, 1, 3, 3]
    assert layers["head"]["shape_after"] == [10, 128]  # 8 of 16 channels x 4 x 4 positions

    smaller = service.client.get(f"/v1/models/{job['result_model_id']}").json()
    assert smaller["num_parameters"] == metrics["params_after"]
    assert [d["dim"] for d in smaller["inputs"][0]["dynamic_dims"]] == [0]
    again = service.wait_for_job(
        submit(service, {"model_id": smaller["id"], "pruning": pruning})["id"]
    )
    assert again["status"] == "succeeded", again["error"]
    assert again["metrics"]["params_after"] < metrics["params_after"]


def test_data_aware_channel_job_reads_its_calibration_dataset(
    service: Service, resnet_pt2: Path, tmp_path: Path
) -> None:
    import numpy as np

    from tests.factories import save_npz

    model = upload(service, resnet_pt2)
    inputs = np.random.default_rng(0).standard_normal((48, 1, 8, 8)).astype(np.float32)
    path = save_npz(tmp_path / "calibration.npz", inputs=inputs)
    with path.open("rb") as f:
        dataset = service.client.post("/v1/datasets", files={"file": (path.name, f)}).json()
    pruning = {"criterion": "apoz", "granularity": "channel", "sparsity": 0.5}
    body = {
        "model_id": model["id"],
        "pruning": pruning,
        "calibration": {"dataset_id": dataset["id"], "num_samples": 32},
    }
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["params_after"] < 0.6 * job["metrics"]["params_before"]
