"""Job events and their listeners: what happens when a job starts or ends, off the job's path.

Whoever commits a job's change of state (the lifecycle; the API when it cancels a queued job)
then calls :func:`publish_job_event` once. That sends one ``shears.notify.job_event`` task to the
notify queue (``SHEARS_NOTIFY_QUEUE``), whose own worker (``worker.notify_app``) runs every
registered listener on it: a pruning job never waits for a webhook, nor a webhook for a pruning job.

A listener is a function of a :class:`JobEvent`, registered by name::

    @listener("mlflow")
    def log_run(event: JobEvent) -> None: ...

in a module listed in ``worker.notify_app.NOTIFY_MODULES``. Every task named ``shears.notify.*``
travels on the notify queue (``worker.celery_app``). A listener may run more than once for one
event (a redelivered message, a retry after another listener failed it), so it must be idempotent,
e.g. keyed on ``event.id``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import structlog
from celery import Celery, Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from shears.db.tables import Job, new_id, utcnow

log = structlog.get_logger("shears.notify")

JOB_EVENT_TASK = "shears.notify.job_event"
JobEventType = Literal["job.started", "job.succeeded", "job.failed", "job.cancelled"]
JOB_EVENTS: tuple[str, ...] = get_args(JobEventType)
# A failing listener is retried alone this many times, this far apart (seconds).
_LISTENER_RETRIES = 5
_LISTENER_RETRY_DELAY = 30.0


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job, with the job as ``GET /v1/jobs/{id}`` showed it then."""

    id: str  # msg_…: unique per event; a webhook's ``webhook-id``
    type: str  # one of JOB_EVENTS
    job_id: str
    tenant: str
    timestamp: str  # RFC 3339 UTC, when the change was committed
    data: dict[str, Any]


Listener = Callable[[JobEvent], None]
_LISTENERS: dict[str, Listener] = {}


def listener(name: str) -> Callable[[Listener], Listener]:
    """Register the decorated function to run on every job event."""

    def register(function: Listener) -> Listener:
        if name in _LISTENERS:
            raise ValueError(f"a job event listener named {name!r} is already registered")
        _LISTENERS[name] = function
        return function

    return register


def listeners() -> dict[str, Listener]:
    return dict(_LISTENERS)


def publish_job_event(
    celery: Celery, sessions: sessionmaker[Session], job_id: str, event_type: JobEventType
) -> bool:
    """Announce ``event_type`` for ``job_id``; call only after the change is committed.

    Never raises: a broker or database failure loses the notification, never the job."""
    try:
        # Here, not at the top: the notify worker imports this module and must not load torch,
        # which the job body's metric names come from.
        from shears.jobview import job_json

        with sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                return False
            event = JobEvent(
                id=new_id("msg"),
                type=event_type,
                job_id=job.id,
                tenant=job.tenant,
                timestamp=utcnow().isoformat().replace("+00:00", "Z"),
                data=job_json(job),
            )
        celery.send_task(JOB_EVENT_TASK, args=[asdict(event)])
    except Exception as exc:
        log.warning("job event not published", job_id=job_id, event_type=event_type, error=str(exc))
        return False
    return True


def dispatch(event: JobEvent, only: list[str] | None = None) -> list[str]:
    """Run the listeners (or those named in ``only``); returns the names of those that failed."""
    failed = []
    for name, function in _LISTENERS.items():
        if only is not None and name not in only:
            continue
        try:
            function(event)
        except Exception:  # one listener's failure must not stop the others
            log.exception("job event listener failed", listener=name, event_id=event.id)
            failed.append(name)
    return failed


@shared_task(name=JOB_EVENT_TASK, bind=True, max_retries=_LISTENER_RETRIES)  # type: ignore[untyped-decorator]
def job_event(self: Task[Any, Any], event: dict[str, Any], only: list[str] | None = None) -> None:
    failed = dispatch(JobEvent(**event), only)
    if failed and self.request.retries < _LISTENER_RETRIES:
        self.retry(kwargs={"event": event, "only": failed}, countdown=_LISTENER_RETRY_DELAY)
