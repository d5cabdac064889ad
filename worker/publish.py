"""Publishing a job to the broker: the one way the API and the sweeper wake a worker.

Call it only after the job's row is committed: the row is the truth, the message a wake-up call.
"""

from __future__ import annotations

import structlog
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shears.db import repository as repo
from shears.settings import Settings, get_settings
from worker.celery_app import RUN_JOB_TASK
from worker.routing import choose_queue

log = structlog.get_logger("shears.publish")


def publish_job(
    celery: Celery, sessions: sessionmaker[Session], job_id: str, settings: Settings | None = None
) -> bool:
    """Send ``run_job(job_id)`` with the job id as task id to the queue the job needs now (see
    :mod:`worker.routing`), then record ``enqueued_at`` and the queue in a transaction of its
    own. False when the broker is unreachable: the row stays as it was and the sweeper publishes
    the job later (a duplicate message is harmless, the claim refuses it)."""
    settings = settings or get_settings()
    try:
        with sessions() as session:
            queue = choose_queue(session, job_id, settings)
    except Exception as exc:
        log.warning("routing failed; the sweeper will retry", job_id=job_id, error=str(exc))
        return False
    try:
        celery.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue)
    except Exception as exc:
        log.warning("publish failed; the sweeper will retry", job_id=job_id, error=str(exc))
        return False
    with sessions.begin() as session:
        repo.mark_enqueued(session, job_id, queue)
    return True
