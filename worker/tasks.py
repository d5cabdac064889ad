"""Celery tasks: thin wrappers that take ids and hand them to the lifecycle."""

from __future__ import annotations

from typing import Any

from worker import lifecycle, signals
from worker.celery_app import RUN_JOB_TASK, app

__all__ = ["run_job", "signals"]


@app.task(name=RUN_JOB_TASK, bind=True)  # type: ignore[untyped-decorator]
def run_job(self: Any, job_id: str) -> None:
    # The node name (``shears-<pid>@<host>``) goes on the job: which process ran which attempt.
    lifecycle.run_job(job_id, worker=self.request.hostname)
