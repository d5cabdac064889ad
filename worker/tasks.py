"""Celery tasks: thin wrappers that take ids and hand them to the lifecycle."""

from __future__ import annotations

from worker import lifecycle, search
from worker.celery_app import RUN_JOB_TASK, app


@app.task(name=RUN_JOB_TASK)  # type: ignore[untyped-decorator]
def run_job(job_id: str) -> None:
    lifecycle.run_job(job_id)


@app.task(name=search.SCAN_TASK)  # type: ignore[untyped-decorator]
def scan_cells(job_id: str) -> None:
    search.run_scan_task(job_id)
