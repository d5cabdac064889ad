"""The sweeper: publishes again the jobs that a lost message or a dead worker left behind.

The database row is the truth about a job; the broker only carries wake-up calls. So a job whose
publish failed (broker down), whose message was lost (broker restart), or whose worker died (lease
expired) is simply published again. A duplicate is harmless: the claim refuses it.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import structlog
from celery import Celery

from shears.db import repository as repo
from shears.db.tables import utcnow
from shears.settings import Settings
from worker.db import sessions
from worker.publish import publish_job
from worker.webhooks import republish_overdue

log = structlog.get_logger("shears.sweeper")


def sweep_once(celery: Celery, settings: Settings) -> list[str]:
    """Publish every stale job once; returns the ids published."""
    published = []
    enqueued_before = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    with sessions()() as session:
        job_ids = repo.stale_jobs(session, enqueued_before)
    for job_id in job_ids:
        if not publish_job(celery, sessions(), job_id, settings):
            break  # the broker is down: the next sweep tries again
        published.append(job_id)
    if published:
        log.info("republished stale jobs", job_ids=published)
    return published


def run_forever(celery: Celery, settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.sweep_interval_seconds):
        try:
            sweep_once(celery, settings)
            republish_overdue(celery)  # webhook attempts whose message was lost
        except Exception:  # the database may be down for a while: keep sweeping
            log.warning("sweep failed", exc_info=True)
