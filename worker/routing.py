"""Which queue a job travels on: the GPU queue for work that needs a GPU, while a GPU worker is
there to take it; the CPU queue otherwise.

What counts as GPU work is a list of rules, one per kind of work: a new kind registers a rule
with :func:`gpu_work` rather than growing a condition here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from shears.db import workers
from shears.db.tables import Job, Model, utcnow
from shears.settings import Settings

# (the job's stored spec, its model's format) -> whether the job needs a GPU.
GpuRule = Callable[[dict[str, Any], str], bool]
_GPU_RULES: list[GpuRule] = []


def gpu_work(rule: GpuRule) -> GpuRule:
    """Register ``rule``: a job any rule claims goes to the GPU queue when one is served."""
    _GPU_RULES.append(rule)
    return rule


@gpu_work
def _fine_tunes(spec: dict[str, Any], model_format: str) -> bool:
    return bool(spec.get("fine_tune")) and not spec.get("dry_run", False)


@gpu_work
def _prunes_a_language_model(spec: dict[str, Any], model_format: str) -> bool:
    return model_format == "hf" and not spec.get("dry_run", False)


def needs_gpu(spec: dict[str, Any], model_format: str) -> bool:
    return any(rule(spec, model_format) for rule in _GPU_RULES)


def gpu_served(session: Session, settings: Settings) -> bool:
    """A worker on the GPU queue has renewed its heartbeat within the job lease."""
    since = utcnow() - timedelta(seconds=settings.job_lease_seconds)
    return workers.queue_alive(session, settings.gpu_queue, since)


def choose_queue(session: Session, job_id: str, settings: Settings) -> str:
    """The queue for ``job_id`` now (the default queue for a job that is gone)."""
    job = session.get(Job, job_id)
    if job is None:
        return settings.queue
    model = session.get(Model, job.model_id)
    model_format = model.format if model is not None else ""
    if needs_gpu(job.spec, model_format) and gpu_served(session, settings):
        return settings.gpu_queue
    return settings.queue
