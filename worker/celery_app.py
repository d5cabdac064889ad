"""The Celery application. The API imports this module to enqueue, so it must stay light:
no torch, no task code (the worker loads ``worker.tasks`` through ``include``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import setup_logging

from shears.logs import configure_logging
from shears.settings import Settings, get_settings

RUN_JOB_TASK = "shears.run_job"
# Tasks named so travel on the notify queue (worker.notify): webhooks, job event listeners.
NOTIFY_TASKS = "shears.notify.*"


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.resolved_broker_url.startswith("redis"):
        # Redis re-delivers an unacknowledged message after visibility_timeout. With acks_late
        # the ack comes when the job ends, so the timeout must outlast the longest job or a healthy
        # job would be delivered twice (the claim would then refuse the copy, but it would wait).
        return {"visibility_timeout": settings.job_time_limit_seconds + 600}
    # kombu's SQLAlchemy transport hands these options to create_engine: Redis-style keys break it.
    return {}


def create_celery(
    settings: Settings | None = None, include: Sequence[str] = ("worker.tasks",)
) -> Celery:
    settings = settings or get_settings()
    app = Celery("shears", broker=settings.resolved_broker_url, include=list(include))
    app.conf.update(
        task_default_queue=settings.queue,
        # Notifications have a queue and a worker of their own: a webhook never waits behind an
        # hour-long pruning job, and a slow webhook receiver never holds up a job.
        task_routes={NOTIFY_TASKS: {"queue": settings.notify_queue}},
        # The database row is the truth about a job; Celery results would be a second one.
        task_ignore_result=True,
        # Ack after the job, not before: a worker that dies mid-job leaves the message to be
        # re-delivered, and the claim in the database stops a live job from running twice.
        task_acks_late=True,
        # ...and a child killed by the OS (OOM, SIGKILL) counts as lost, so the message returns too.
        task_reject_on_worker_lost=True,
        # A worker holds one job at a time; prefetching would strand jobs behind a long one.
        worker_prefetch_multiplier=1,
        # Hard limit kills a stuck child; the soft one lets the job record why it stopped.
        task_time_limit=settings.job_time_limit_seconds,
        task_soft_time_limit=int(settings.job_time_limit_seconds * 0.95),
        broker_transport_options=_transport_options(settings),
        # Keep trying the broker at start-up rather than exiting while it restarts.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Publishing must not hang an HTTP request while the broker is down: a few quick tries,
        # then the job stays queued in the database and the sweeper enqueues it later.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        # Our JSON logging stays in charge of the root logger.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Only JSON crosses the broker: a message can never carry a pickle.
        task_serializer="json",
        accept_content=["json"],
        # No remote-control or events traffic is needed; less chatter on the broker.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


@setup_logging.connect  # type: ignore[untyped-decorator]
def _json_logs(**_: Any) -> None:
    # Connecting this signal stops Celery from installing its own handlers: worker logs are JSON
    # like the API's, with job_id bound by the lifecycle.
    configure_logging(get_settings().log_level)


app = create_celery()
