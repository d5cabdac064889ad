"""What the worker process itself decides: the device it measures on, and its time limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.e2e.test_walkthrough import submit, upload
from tests.factories import save_npz

PRUNE = {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5}


@pytest.fixture
def gpu_worker_without_gpu(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    svc = start_service(request, tmp_path_factory, "embedded", SHEARS_TRAIN_DEVICE="cuda:3")
    try:
        yield svc
    finally:
        svc.stop()


def test_latency_is_measured_on_the_workers_device(
    gpu_worker_without_gpu: Service, resnet_pt2: Path
) -> None:
    """A job that neither fine-tunes nor evaluates touches the worker's device only to measure
    latency: a worker told to use ``cuda:3`` on a machine without it must fail that job, saying
    so -- which proves the device reaches the measurement (it used to be measured on the CPU
    whatever the worker's device)."""
    svc = gpu_worker_without_gpu
    model = upload(svc, resnet_pt2)
    job = svc.wait_for_job(submit(svc, {"model_id": model["id"], "pruning": PRUNE})["id"])
    assert job["status"] == "failed"
    assert job["error"]["type"] == "device_unavailable"
    assert "cuda:3" in job["error"]["message"]


@pytest.fixture
def short_limit(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    # Soft limit at 95% of 8 s: a long fine-tune passes it, a plain prune does not.
    svc = start_service(request, tmp_path_factory, "embedded", SHEARS_JOB_TIME_LIMIT_SECONDS="8")
    try:
        yield svc
    finally:
        svc.stop()


def test_a_job_past_its_time_limit_fails_with_its_own_error_type(
    short_limit: Service, resnet_pt2: Path, tmp_path: Path
) -> None:
    svc = short_limit
    model = upload(svc, resnet_pt2)
    rng = np.random.default_rng(0)
    data = save_npz(
        tmp_path / "train.npz",
        inputs=rng.standard_normal((64, 1, 8, 8)).astype(np.float32),
        targets=rng.integers(0, 10, 64),
    )
    dataset = upload(svc, data, collection="datasets")
    endless = {"dataset_id": dataset["id"], "steps": 10_000_000, "batch_size": 8}
    body = {"model_id": model["id"], "pruning": PRUNE, "fine_tune": endless}
    job = svc.wait_for_job(submit(svc, body)["id"], timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "time_limit_exceeded", job["error"]
    assert "time limit of 8 s" in job["error"]["message"]

    # The worker survived and measures on its own device.
    quick = svc.wait_for_job(submit(svc, {"model_id": model["id"], "pruning": PRUNE})["id"])
    assert quick["status"] == "succeeded", quick["error"]
    assert quick["metrics"]["device"] == "cpu"
