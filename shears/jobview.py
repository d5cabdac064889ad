"""The job as the public contract shows it: ``GET /v1/jobs/{id}`` and the ``data`` of a job event
(webhooks) are built here, so they cannot drift apart."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import Row

from core.report import Metrics
from shears.db.repository import ArtifactSummary
from shears.db.tables import Artifact, Job

_METRICS = tuple(f.name for f in dataclasses.fields(Metrics))
_EVALS = ("eval_before", "eval_after_pruning", "eval_after_fine_tune")


def job_body(
    job: Job | Row[Any], artifacts: Iterable[Artifact | ArtifactSummary]
) -> dict[str, Any]:
    """The contract's job object from its row (an ORM object, or a Core row) and artifacts."""
    return {
        "id": job.id,
        "status": job.status,
        "model_id": job.model_id,
        "name": job.name,
        "dry_run": bool(job.spec.get("dry_run", False)),
        "spec": job.spec,
        "spec_version": job.spec_version,
        "attempts": job.attempts,
        "progress": {"stage": job.progress_stage, "fraction": job.progress_fraction},
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "metrics": job.metrics or {},
        "error": {"type": job.error_type, "message": job.error_message or ""}
        if job.error_type
        else None,
        "result_model_id": job.result_model_id,
        "queue": job.queue,
        "worker": job.worker,
        "artifacts": [
            {
                "id": a.id,
                "kind": a.kind,
                "format": a.format,
                "size_bytes": a.size_bytes,
                "sha256": a.sha256,
                "download_url": f"/v1/artifacts/{a.id}/download",
            }
            for a in artifacts
        ],
    }


def job_json(job: Job) -> dict[str, Any]:
    """``job_body`` as JSON values, shaped as the API's response model shapes it: every metric
    present (null until measured), ``accuracy`` and ``loss`` in every score, RFC 3339 times."""
    body = job_body(job, job.artifacts)
    metrics = {**dict.fromkeys(_METRICS), **body["metrics"]}
    for name in _EVALS:
        if isinstance(metrics[name], dict):
            metrics[name] = {"accuracy": None, "loss": None, **metrics[name]}
    body["metrics"] = metrics
    json_body: dict[str, Any] = to_jsonable_python(body)
    return json_body
