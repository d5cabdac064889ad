"""Datasets, fine-tuning and evaluation through the real processes (API + Celery worker)."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.formats.pt2.program import load_program
from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.e2e.test_bad_input import stored_files
from tests.e2e.test_faults import make_service
from tests.e2e.test_walkthrough import submit, upload
from tests.factories import DIGITS_PRUNABLE, Digits, make_digits, save_npz
from tests.problems import assert_problem

pytestmark = pytest.mark.e2e

RECOVER = {"epochs": 8, "batch_size": 32, "lr": 0.005, "warmup_steps": 10}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return make_digits(tmp_path_factory.mktemp("digits"))


def upload_dataset(service: Service, path: Path, name: str | None = None) -> dict:
    return upload(service, path, name, collection="datasets")


def prune_90(model_id: str, **sections) -> dict:
    return {
        "model_id": model_id,
        "pruning": {
            "criterion": "l1",
            "granularity": "unstructured",
            "sparsity": 0.9,
            "scope": "global",
        },
        **sections,
    }


def events(service: Service, job_id: str) -> list[dict]:
    return service.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]


def test_dataset_upload_read_list_delete(service: Service, digits: Digits, tmp_path: Path) -> None:
    first = upload_dataset(service, digits.train, name="digits-train")
    assert first["name"] == "digits-train"
    assert first["format"] == "npz"
    assert first["num_samples"] == 1347
    assert first["has_targets"] is True
    assert first["size_bytes"] == digits.train.stat().st_size
    assert first["sha256"] == hashlib.sha256(digits.train.read_bytes()).hexdigest()
    assert first["arrays"][0] == {"name": "inputs", "shape": [1347, 1, 8, 8], "dtype": "float32"}
    assert service.client.get(f"/v1/datasets/{first['id']}").json() == first

    path = tmp_path / "unlabelled.safetensors"
    save_file({"inputs": torch.zeros(5, 1, 8, 8)}, str(path))
    second = upload_dataset(service, path)
    assert (second["format"], second["num_samples"], second["has_targets"]) == (
        "safetensors",
        5,
        False,
    )
    page = service.client.get("/v1/datasets", params={"limit": 1}).json()
    assert [d["id"] for d in page["items"]] == [second["id"]]  # newest first
    page2 = service.client.get(
        "/v1/datasets", params={"limit": 1, "cursor": page["next_cursor"]}
    ).json()
    assert [d["id"] for d in page2["items"]] == [first["id"]]

    assert service.client.delete(f"/v1/datasets/{second['id']}").status_code == 204
    assert_problem(service.client.get(f"/v1/datasets/{second['id']}"), 404, "not-found")
    assert not any(second["id"] in p.name for p in stored_files(service))


def test_prune_90_fine_tune_and_evaluate(service: Service, digits: Digits) -> None:
    """Dense >= 97%, a drop after pruning 90%, back within 1 point after fine-tuning."""
    model = upload(service, digits.model_path)
    train = upload_dataset(service, digits.train)
    test = upload_dataset(service, digits.test)
    body = prune_90(
        model["id"],
        fine_tune={"dataset_id": train["id"], **RECOVER},
        evaluation={"dataset_id": test["id"]},
    )
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["fine_tune"]["dataset_id"] == train["id"]
    m = job["metrics"]
    assert m["eval_before"]["accuracy"] >= 0.97
    assert m["eval_after_pruning"]["accuracy"] < m["eval_before"]["accuracy"] - 0.05
    assert m["eval_after_fine_tune"]["accuracy"] >= m["eval_before"]["accuracy"] - 0.01
    assert m["eval_after_fine_tune"]["loss"] > 0
    assert m["sparsity"] >= 0.895

    history = events(service, job["id"])
    epochs = [e["data"] for e in history if e["stage"] == "fine_tuning" and e["data"]]
    assert [e["epoch"] for e in epochs] == [float(i) for i in range(1, 9)]
    assert all({"loss", "accuracy", "lr", "step"} <= set(e) for e in epochs)
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    evaluated = [e["data"]["when"] for e in history if e["stage"] == "evaluating" and e["data"]]
    assert evaluated == ["before pruning", "after pruning", "after fine-tuning"]

    (artifact,) = [a for a in job["artifacts"] if a["kind"] == "model"]
    program_bytes = service.client.get(artifact["download_url"]).content
    path = service.data_dir / f"{job['id']}.pt2"
    path.write_bytes(program_bytes)
    program, _ = load_program(path)
    weights = [program.state_dict[f"{n}.weight"] for n in DIGITS_PRUNABLE]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) >= 0.895
    (report,) = [a for a in job["artifacts"] if a["kind"] == "report"]
    assert len(service.client.get(report["download_url"]).json()["fine_tune"]["history"]) == 8
    assert not list(service.storage_dir.glob(f"checkpoints/*/{job['id']}"))


def test_cancel_while_fine_tuning_stops_and_leaves_nothing(
    service: Service, digits: Digits
) -> None:
    model = upload(service, digits.model_path)
    train = upload_dataset(service, digits.train)
    long = {"dataset_id": train["id"], "steps": 10_000_000, "batch_size": 8}
    job = submit(service, prune_90(model["id"], fine_tune=long))
    deadline = time.monotonic() + 120
    while service.client.get(f"/v1/jobs/{job['id']}").json()["progress"]["stage"] != (
        "fine_tuning"
    ):
        assert time.monotonic() < deadline, service.logs("worker")
        time.sleep(0.2)
    # A dataset an active job uses cannot be deleted.
    assert_problem(service.client.delete(f"/v1/datasets/{train['id']}"), 409, "dataset-in-use")

    assert service.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    job = service.wait_for_job(job["id"])
    assert job["status"] == "cancelled"
    assert job["artifacts"] == []
    assert job["result_model_id"] is None
    assert job["progress"]["fraction"] < 0.55  # training stopped far from its end
    assert not list(service.storage_dir.glob(f"artifacts/*/{job['id']}/*"))
    assert not list(service.storage_dir.glob(f"checkpoints/*/{job['id']}"))
    steps = [e for e in events(service, job["id"]) if e["stage"] == "fine_tuning"]
    assert steps  # it was training when the cancel arrived
    assert service.client.delete(f"/v1/datasets/{train['id']}").status_code == 204


def test_a_dataset_that_cannot_feed_the_model_fails_and_the_worker_runs_the_next(
    service: Service, digits: Digits, tmp_path: Path
) -> None:
    model = upload(service, digits.model_path)
    x = np.load(digits.train)["inputs"].reshape(-1, 64)
    flat = upload_dataset(
        service, save_npz(tmp_path / "flat.npz", inputs=x, targets=np.zeros(len(x), np.int64))
    )
    failed = service.wait_for_job(
        submit(service, prune_90(model["id"], fine_tune={"dataset_id": flat["id"], "epochs": 1}))[
            "id"
        ]
    )
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "dataset_mismatch"
    assert "[*, 1, 8, 8]" in failed["error"]["message"]
    assert "[*, 64]" in failed["error"]["message"]
    assert failed["artifacts"] == []

    good = upload_dataset(service, digits.test)
    ok = service.wait_for_job(
        submit(
            service,
            prune_90(
                model["id"],
                fine_tune={"dataset_id": good["id"], "epochs": 1},
                evaluation={"dataset_id": good["id"]},
            ),
        )["id"]
    )
    assert ok["status"] == "succeeded", ok["error"]
    assert ok["metrics"]["eval_after_fine_tune"]["accuracy"] > 0


def test_distillation_and_calibration_run_without_targets(
    service: Service, digits: Digits, tmp_path: Path
) -> None:
    # The refusals (unknown datasets, missing targets) are tested in process: tests/api.
    model = upload(service, digits.model_path)
    unlabelled = upload_dataset(
        service, save_npz(tmp_path / "x.npz", inputs=np.load(digits.test)["inputs"])
    )
    # Distillation learns from the dense model's outputs: no targets needed.
    distil = {"dataset_id": unlabelled["id"], "epochs": 1, "loss": "distillation"}
    job = service.wait_for_job(submit(service, prune_90(model["id"], fine_tune=distil))["id"])
    assert job["status"] == "succeeded", job["error"]
    # Calibration is accepted and stored for data-aware criteria.
    calibrated = submit(
        service,
        {
            **prune_90(model["id"]),
            "calibration": {"dataset_id": unlabelled["id"], "num_samples": 64},
        },
    )
    assert calibrated["spec"]["calibration"] == {
        "dataset_id": unlabelled["id"],
        "num_samples": 64,
        "seq_len": None,
    }
    service.wait_for_job(calibrated["id"])


def test_a_worker_killed_while_fine_tuning_is_resumed_from_its_checkpoint(
    tmp_path: Path, digits: Digits
) -> None:
    svc = make_service(tmp_path, None, None, with_worker=True, SHEARS_CHECKPOINT_EVERY_STEPS="50")
    try:
        model = upload(svc, digits.model_path)
        train = upload_dataset(svc, digits.train)
        body = prune_90(
            model["id"], fine_tune={"dataset_id": train["id"], "steps": 600, "batch_size": 8}
        )
        job_id = submit(svc, body)["id"]
        deadline = time.monotonic() + 120
        while not list(svc.storage_dir.glob(f"checkpoints/*/{job_id}/fine_tune.pt")):
            assert time.monotonic() < deadline, svc.logs("worker")
            time.sleep(0.05)
        svc.stop_process("worker", signal.SIGKILL)  # the main process and its pool child
        svc.start_worker()

        job = svc.wait_for_job(job_id, timeout=180)
        assert job["status"] == "succeeded", (job["error"], svc.logs("worker"))
        assert job["attempts"] == 2
        messages = [e["message"] for e in events(svc, job_id)]
        assert any(m.startswith("resumed from the checkpoint at step") for m in messages)
        (report,) = [a for a in job["artifacts"] if a["kind"] == "report"]
        resumed = svc.client.get(report["download_url"]).json()["fine_tune"]["resumed_from_step"]
        assert resumed >= 50
        assert not list(svc.storage_dir.glob(f"checkpoints/*/{job_id}"))
    finally:
        svc.stop()


def test_another_tenants_dataset_answers_404_and_cannot_be_used(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, digits: Digits
) -> None:
    # The queries are the same on both backends; one service keeps this cheap.
    svc = start_service(
        request,
        tmp_path_factory,
        "embedded",
        SHEARS_API_KEYS="acme:key-acme-0123,globex:key-g-0123",
    )
    try:
        acme, globex = svc.as_tenant("key-acme-0123"), svc.as_tenant("key-g-0123")
        with digits.test.open("rb") as f:
            dataset = acme.post("/v1/datasets", files={"file": ("t.npz", f)}).json()
        assert_problem(svc.client.get("/v1/datasets"), 401, "unauthorized")
        for method in ("GET", "DELETE"):
            assert_problem(
                globex.request(method, f"/v1/datasets/{dataset['id']}"), 404, "not-found"
            )
        assert globex.get("/v1/datasets").json()["items"] == []
        with digits.model_path.open("rb") as f:
            model = globex.post("/v1/models", files={"file": ("m.pt2", f)}).json()
        body = prune_90(model["id"], evaluation={"dataset_id": dataset["id"]})
        assert_problem(globex.post("/v1/jobs", json=body), 404, "not-found")
        assert acme.get(f"/v1/datasets/{dataset['id']}").status_code == 200
    finally:
        svc.stop()
