"""Queue choice and the worker's devices, on CPU: GPU work goes to the GPU queue only while a GPU
worker's heartbeat is fresh; ``shears worker`` takes the GPU queue by default only when CUDA is
visible (an injected probe stands in for the driver); pool children are pinned one GPU each,
before CUDA is initialised; a device string that is not one stops the worker at start."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from shears.cli import app as cli
from shears.db import workers
from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from shears.db.tables import WorkerHeartbeat, utcnow
from shears.settings import Settings, get_settings
from tests.service.test_lifecycle import add_job as lifecycle_job
from worker.devices import (
    check_device_string,
    default_queues,
    gpu_for_child,
    pin_child,
    visible_gpus,
)
from worker.routing import choose_queue

SETTINGS = Settings(queue="cpu-q", gpu_queue="gpu-q", job_lease_seconds=30)
FINE_TUNE = {
    "pruning": {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5},
    "fine_tune": {"dataset_id": "dst_x", "steps": 10},
}
PRUNE_ONLY = {"pruning": {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5}}


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def add_job(sessions: sessionmaker[Session], spec: dict, model_format: str = "pt2") -> str:
    return lifecycle_job(sessions, model_format, spec=spec)


def queue_of(sessions: sessionmaker[Session], job_id: str) -> str:
    with sessions() as session:
        return choose_queue(session, job_id, SETTINGS)


def announce(sessions: sessionmaker[Session], worker: str, queues: list[str]) -> None:
    with sessions.begin() as session:
        workers.announce(session, worker, queues, "host", 1, 1)


def test_gpu_work_goes_to_the_gpu_queue_only_while_a_gpu_worker_beats(sessions) -> None:
    fine_tune = add_job(sessions, FINE_TUNE)
    language_model = add_job(sessions, PRUNE_ONLY, model_format="hf")
    prune_only = add_job(sessions, PRUNE_ONLY)
    dry_run = add_job(sessions, {**FINE_TUNE, "dry_run": True})
    announce(sessions, "shears-1@cpu-host", ["cpu-q"])
    # No GPU worker: everything goes where it will be served.
    assert {queue_of(sessions, j) for j in (fine_tune, language_model, prune_only)} == {"cpu-q"}

    announce(sessions, "shears-2@gpu-host", ["cpu-q", "gpu-q"])
    assert queue_of(sessions, fine_tune) == "gpu-q"
    assert queue_of(sessions, language_model) == "gpu-q"
    assert queue_of(sessions, prune_only) == "cpu-q"
    assert queue_of(sessions, dry_run) == "cpu-q"

    # Its heartbeat older than the lease: the GPU worker is gone, GPU work falls back to the CPU.
    with sessions.begin() as session:
        session.execute(update(WorkerHeartbeat).values(seen_at=utcnow() - timedelta(seconds=31)))
    assert queue_of(sessions, fine_tune) == "cpu-q"
    announce(sessions, "shears-2@gpu-host", ["cpu-q", "gpu-q"])  # renewed: back on the GPU
    assert queue_of(sessions, fine_tune) == "gpu-q"
    with sessions.begin() as session:
        workers.forget(session, "shears-2@gpu-host")  # a clean shutdown
    assert queue_of(sessions, fine_tune) == "cpu-q"


def test_a_heartbeat_renews_its_row_and_old_rows_are_pruned(sessions) -> None:
    announce(sessions, "w1", ["cpu-q"])
    announce(sessions, "w1", ["cpu-q"])
    with sessions.begin() as session:
        assert len(workers.alive(session, utcnow() - timedelta(seconds=5))) == 1
        workers.prune(session, utcnow() + timedelta(seconds=1))
        assert workers.alive(session, utcnow() - timedelta(days=1)) == []


def test_default_queues_follow_the_cuda_probe() -> None:
    no_gpu = visible_gpus(probe=lambda: 0, env={})
    assert no_gpu == []
    assert default_queues(SETTINGS, no_gpu) == ["cpu-q"]
    two = visible_gpus(probe=lambda: 2, env={})
    assert two == ["0", "1"]
    assert default_queues(SETTINGS, two) == ["cpu-q", "gpu-q"]
    assert visible_gpus(probe=lambda: 8, env={"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert visible_gpus(probe=lambda: 8, env={"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus(probe=lambda: 8, env={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus(probe=lambda: 0, env={"CUDA_VISIBLE_DEVICES": "0"}) == []


def test_each_pool_child_is_pinned_to_one_gpu_before_cuda_starts() -> None:
    gpus = ["3", "5"]
    assert [gpu_for_child(i, gpus) for i in range(4)] == ["3", "5", "3", "5"]
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "3,5"}
    assert pin_child(1, gpus, env) == "5"
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    assert pin_child(0, [], env) is None  # no GPU: nothing to pin
    # The real probe runs nvidia-smi in another process: this one never initialises CUDA.
    visible_gpus()
    assert not torch.cuda.is_initialized()


def test_a_device_string_that_is_not_one_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_device_string("cuda:1")  # a well-formed device is the child's to check
    with pytest.raises(ValueError, match="is not a torch device"):
        check_device_string("tpu-ish:zero")
    monkeypatch.setenv("SHEARS_TRAIN_DEVICE", "tpu-ish:zero")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["worker"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "SHEARS_TRAIN_DEVICE='tpu-ish:zero' is not a torch device" in result.output


def test_worker_refuses_an_empty_queue_list() -> None:
    result = CliRunner().invoke(cli, ["worker", "--queues", " , "])
    assert result.exit_code == 2
    assert "queue names" in result.output
