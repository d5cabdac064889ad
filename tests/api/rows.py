"""Rows the worker would have written, for the API tier, which runs no worker: a finished job with
its metrics, layers, artifacts (files included) and result model. Plain functions."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from core.pipeline import LayerResult, Metrics
from shears.db import repository as repo
from shears.db.tables import Artifact, Job, JobLayer, Model, new_id, utcnow
from shears.storage import LocalStorage

METRICS = Metrics(
    sparsity=0.8,
    params_before=1000,
    params_after=1000,
    nonzero_params_after=200,
    macs_before=5000,
    macs_after=5000,
    size_bytes_before=4000,
    size_bytes_after=4100,
    sparse_size_bytes_after=900,
    latency_ms_before=1.5,
    latency_ms_after=1.25,
    latency_batch_size=32,
    device="cpu",
    eval_before={"accuracy": 0.9, "loss": 0.3, "top_k_accuracy": 0.99},
)
LAYERS = (
    LayerResult("stem", "conv2d", (8, 1, 3, 3), (8, 1, 3, 3), 72, 14, 1 - 14 / 72),
    LayerResult("head", "linear", (10, 256), (10, 256), 2560, 512, 0.8),
)


def finished_job(
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    tenant: str,
    model_id: str,
    status: str = "succeeded",
) -> str:
    """A job of ``tenant`` on ``model_id`` that ended as ``status``: metrics, layers and (when it
    succeeded) a report artifact on storage and a result model. Returns its id."""
    job_id = new_id("job")
    now = utcnow()
    with sessions.begin() as session:
        model = repo.get_model(session, tenant, model_id)
        assert model is not None
        job = Job(
            id=job_id,
            tenant=tenant,
            model_id=model_id,
            status=status,
            spec={"pruning": {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.8}},
            spec_version=1,
            attempts=1,
            progress_stage="done",
            progress_fraction=1.0,
            cancel_requested=False,
            created_at=now - timedelta(seconds=5),
            started_at=now - timedelta(seconds=4),
            finished_at=now,
            metrics=asdict(METRICS) if status == "succeeded" else None,
            error_type=None if status == "succeeded" else "pruning_failed",
            error_message=None if status == "succeeded" else "it broke",
        )
        session.add(job)
        session.flush()
        if status != "succeeded":
            return job_id
        session.add_all(
            JobLayer(job_id=job_id, position=i, **asdict(layer)) for i, layer in enumerate(LAYERS)
        )
        key = f"artifacts/{tenant}/{job_id}/report.json"
        stored = _put(storage, key)
        session.add(
            Artifact(
                id=new_id("art"),
                tenant=tenant,
                job_id=job_id,
                kind="report",
                format="json",
                size_bytes=stored[0],
                sha256=stored[1],
                storage_key=key,
                created_at=now,
            )
        )
        result_id = new_id("mdl")
        result = Model(
            id=result_id,
            tenant=tenant,
            name="pruned",
            format=model.format,
            size_bytes=model.size_bytes,
            sha256=model.sha256,
            num_parameters=model.num_parameters,
            inputs=model.inputs,
            prunable_layers=model.prunable_layers,
            storage_key=f"models/{tenant}/{result_id}.pt2",  # no file: never downloaded here
            source_job_id=job_id,
            created_at=now,
        )
        session.add(result)
        session.flush()
        job.result_model_id = result.id
    return job_id


def _put(storage: LocalStorage, key: str) -> tuple[int, str]:
    content = b'{"report": true}'
    temp = storage.temp_path()
    temp.write_bytes(content)
    storage.commit(temp, key)
    return len(content), hashlib.sha256(content).hexdigest()
