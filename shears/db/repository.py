"""Every query Shears makes. Callers own the transaction: nothing here commits."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Row,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from core.formats import ModelInfo
from shears.db.tables import (
    Artifact,
    Dataset,
    Job,
    JobEvent,
    JobLayer,
    Model,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)

ACTIVE_STATUSES = ("queued", "running")


_Paged = TypeVar("_Paged", Model, Job, Dataset, WebhookEndpoint, WebhookDelivery)


def _rowcount(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


class InvalidCursor(ValueError):
    """A list cursor that this service did not hand out."""


def encode_cursor(created_at: datetime, id_: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{id_}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        stamp, id_ = raw.split("|", 1)
        return datetime.fromisoformat(stamp), id_
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursor(cursor) from exc


def _page(
    session: Session, entity: type[_Paged], stmt: Any, limit: int, cursor: str | None
) -> tuple[list[_Paged], str | None]:
    """Newest first, keyset-paginated on (created_at, id) so pages stay stable under inserts."""
    if cursor:
        at, id_ = decode_cursor(cursor)
        stmt = stmt.where(
            or_(entity.created_at < at, (entity.created_at == at) & (entity.id < id_))
        )
    rows = list(
        session.scalars(stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1))
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, next_cursor


# --- models -------------------------------------------------------------------------------------


def model_row(
    model_id: str,
    tenant: str,
    name: str,
    info: ModelInfo,
    key: str,
    size_bytes: int,
    sha256: str,
    source_job_id: str | None = None,
) -> Model:
    """A model row from the gate's metadata of its archive (never from loaded weights)."""
    return Model(
        id=model_id,
        tenant=tenant,
        name=name,
        format=info.format,
        size_bytes=size_bytes,
        sha256=sha256,
        num_parameters=info.num_parameters,
        inputs=[asdict(i) for i in info.inputs],
        prunable_layers=[asdict(layer) for layer in info.prunable_layers],
        details=info.details(),
        storage_key=key,
        source_job_id=source_job_id,
        created_at=utcnow(),
    )


def get_model(session: Session, tenant: str, model_id: str) -> Model | None:
    return session.scalar(
        select(Model).where(
            Model.id == model_id, Model.tenant == tenant, Model.deleted_at.is_(None)
        )
    )


def list_models(
    session: Session, tenant: str, limit: int, cursor: str | None
) -> tuple[list[Model], str | None]:
    stmt = select(Model).where(Model.tenant == tenant, Model.deleted_at.is_(None))
    return _page(session, Model, stmt, limit, cursor)


def model_in_use(session: Session, model_id: str) -> bool:
    stmt = select(exists().where(Job.model_id == model_id, Job.status.in_(ACTIVE_STATUSES)))
    return bool(session.scalar(stmt))


# --- datasets -----------------------------------------------------------------------------------


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset | None:
    return session.scalar(
        select(Dataset).where(
            Dataset.id == dataset_id, Dataset.tenant == tenant, Dataset.deleted_at.is_(None)
        )
    )


def list_datasets(
    session: Session, tenant: str, limit: int, cursor: str | None
) -> tuple[list[Dataset], str | None]:
    stmt = select(Dataset).where(Dataset.tenant == tenant, Dataset.deleted_at.is_(None))
    return _page(session, Dataset, stmt, limit, cursor)


def dataset_in_use(session: Session, tenant: str, dataset_id: str) -> bool:
    """Whether a queued or running job of ``tenant`` names the dataset in its spec.

    The ids live inside the spec's JSON, which SQLite and PostgreSQL query differently; active
    jobs per tenant are few (queued jobs are capped), so they are read and checked here.
    """
    specs = session.scalars(
        select(Job.spec).where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    )
    return any(dataset_id in dataset_ids(spec).values() for spec in specs)


def dataset_ids(spec: dict[str, Any]) -> dict[str, str]:
    """``{section: dataset_id}`` for the spec's sections that name a dataset."""
    ids = {}
    for section in ("calibration", "fine_tune", "evaluation"):
        value = spec.get(section)
        if isinstance(value, dict) and isinstance(value.get("dataset_id"), str):
            ids[section] = value["dataset_id"]
    search = (spec.get("pruning") or {}).get("search")  # a target's scan data (optional)
    if isinstance(search, dict) and isinstance(search.get("dataset_id"), str):
        ids["search"] = search["dataset_id"]
    return ids


# --- jobs ---------------------------------------------------------------------------------------


def get_job(session: Session, tenant: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))


class ArtifactSummary(NamedTuple):
    """What a job body shows of one artifact."""

    id: str
    kind: str
    format: str
    size_bytes: int
    sha256: str


_JOBS, _ARTIFACTS = Job.__table__, Artifact.__table__
# The status poll's one statement: the job and its artifacts in one round trip and one snapshot
# (Core, built once: no ORM identity map, no per-call compile or second "selectin" query).
_JOB_WITH_ARTIFACTS = (
    select(
        *_JOBS.c,
        *(_ARTIFACTS.c[name].label(f"artifact_{name}") for name in ArtifactSummary._fields),
    )
    .outerjoin(_ARTIFACTS, _ARTIFACTS.c.job_id == _JOBS.c.id)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant == bindparam("tenant"))
    .order_by(_ARTIFACTS.c.kind)  # as Job.artifacts orders them
)


def job_with_artifacts(
    connection: Connection, tenant: str, job_id: str
) -> tuple[Row[Any], list[ArtifactSummary]] | None:
    """The job's columns (by name) and its artifacts; None when the tenant has no such job."""
    rows = connection.execute(_JOB_WITH_ARTIFACTS, {"job_id": job_id, "tenant": tenant}).all()
    if not rows:
        return None
    artifacts = [
        ArtifactSummary(*(getattr(row, f"artifact_{name}") for name in ArtifactSummary._fields))
        for row in rows
        if row.artifact_id is not None
    ]
    return rows[0], artifacts


def job_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))


def count_queued(session: Session, tenant: str) -> int:
    stmt = select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.status == "queued")
    return int(session.scalar(stmt) or 0)


def get_job_any_tenant(session: Session, job_id: str) -> Job | None:
    """For the worker, which acts on ids the API already scoped."""
    return session.get(Job, job_id)


def list_jobs(
    session: Session,
    tenant: str,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    model_id: str | None = None,
) -> tuple[list[Job], str | None]:
    stmt = select(Job).where(Job.tenant == tenant)
    if status:
        stmt = stmt.where(Job.status == status)
    if model_id:
        stmt = stmt.where(Job.model_id == model_id)
    return _page(session, Job, stmt, limit, cursor)


def job_layers(session: Session, job_id: str) -> Sequence[JobLayer]:
    return session.scalars(
        select(JobLayer).where(JobLayer.job_id == job_id).order_by(JobLayer.position)
    ).all()


def job_events(
    session: Session, job_id: str, limit: int, after_id: int | None
) -> tuple[list[JobEvent], int | None]:
    """Oldest first; the cursor is the last event id seen."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after_id is not None:
        stmt = stmt.where(JobEvent.id > after_id)
    rows = list(session.scalars(stmt.order_by(JobEvent.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


_EVENTS = JobEvent.__table__
# The event stream's poll, two statements built once (Core, as the status poll): the job's state
# first, then its events after the client's cursor. A final status read first guarantees the events
# read second include the final event, which the worker commits in the same transaction.
_JOB_STATE = select(_JOBS.c.status, _JOBS.c.progress_stage, _JOBS.c.progress_fraction).where(
    _JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant == bindparam("tenant")
)
_EVENTS_AFTER = (
    select(_EVENTS.c.id, _EVENTS.c.at, _EVENTS.c.stage, _EVENTS.c.message, _EVENTS.c.data)
    .where(_EVENTS.c.job_id == bindparam("job_id"), _EVENTS.c.id > bindparam("after"))
    .order_by(_EVENTS.c.id)
    .limit(bindparam("limit"))
)


def job_state_and_events(
    connection: Connection, tenant: str, job_id: str, after: int, limit: int
) -> tuple[Row[Any], Sequence[Row[Any]]] | None:
    """The job's status and progress, then up to ``limit`` of its events with ids above
    ``after``, oldest first; None when the tenant has no such job."""
    state = connection.execute(_JOB_STATE, {"job_id": job_id, "tenant": tenant}).first()
    if state is None:
        return None
    events = connection.execute(
        _EVENTS_AFTER, {"job_id": job_id, "after": after, "limit": limit}
    ).all()
    return cast(Row[Any], state), cast(Sequence[Row[Any]], events)


def add_event(
    session: Session, job_id: str, stage: str, message: str, data: dict[str, Any] | None = None
) -> None:
    session.add(JobEvent(job_id=job_id, stage=stage, message=message, data=data, at=utcnow()))


def claim_job(
    session: Session, job_id: str, lease_seconds: float, worker: str | None = None
) -> int | None:
    """Take ``job_id`` for this worker in one conditional update.

    Claimable: ``queued`` (and not being cancelled), or ``running`` with an expired lease (its
    worker died). Returns the job's attempt number, or None when someone else owns it, it is
    finished, or it is gone: then the delivery is a duplicate and must do nothing.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            or_(
                Job.status == "queued",
                (Job.status == "running") & (Job.lease_expires_at < now),
            ),
        )
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            progress_stage="loading",
            progress_fraction=0.0,
            worker=worker,
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        return None
    return session.scalar(select(Job.attempts).where(Job.id == job_id))


def _owned(job_id: str, attempt: int) -> Any:
    """A running job still held by the attempt that claimed it (a zombie writes nothing)."""
    return (Job.id == job_id) & (Job.status == "running") & (Job.attempts == attempt)


def renew_lease(session: Session, job_id: str, attempt: int, lease_seconds: float) -> bool | None:
    """Extend the lease. Returns whether a cancel was requested, or None if the job is not ours."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested)
    )
    row = result.first()
    return None if row is None else bool(row[0])


def set_progress(
    session: Session, job_id: str, attempt: int, stage: str, fraction: float
) -> bool | None:
    """Record progress. Returns whether a cancel was requested, or None if the job is not ours:
    the same write tells a training loop about a cancel without waiting for the next lease beat."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(progress_stage=stage, progress_fraction=fraction)
        .returning(Job.cancel_requested)
    )
    row = result.first()
    return None if row is None else bool(row[0])


def finish_job(
    session: Session, job_id: str, attempt: int, status: str, values: dict[str, Any]
) -> bool:
    """Move an owned running job to a final ``status``; False if the attempt lost ownership.

    Success also needs that no cancel was asked for meanwhile: a cancelled job keeps no results.
    """
    condition = _owned(job_id, attempt)
    if status == "succeeded":
        condition = condition & Job.cancel_requested.is_(False)
    result = session.execute(
        update(Job)
        .where(condition)
        .values(status=status, finished_at=utcnow(), lease_expires_at=None, **values)
    )
    return _rowcount(result) == 1


def fail_unclaimable(session: Session, job_id: str, message: str) -> bool:
    """Fail a job that ran out of attempts without running it again."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
        .values(
            status="failed",
            finished_at=utcnow(),
            lease_expires_at=None,
            error_type="too_many_attempts",
            error_message=message,
        )
    )
    return _rowcount(result) == 1


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel a queued job at once, flag a running one; returns the new status or None if final."""
    queued = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="cancelled", cancel_requested=True, finished_at=utcnow(), progress_stage="done"
        )
    )
    if _rowcount(queued) == 1:
        return "cancelled"
    running = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
    )
    return "running" if _rowcount(running) == 1 else None


def stale_jobs(session: Session, enqueued_before: datetime, limit: int = 100) -> list[str]:
    """Jobs a lost message or a dead worker left behind: queued jobs never published or published
    before ``enqueued_before``, and running jobs whose lease expired."""
    now = utcnow()
    stmt = (
        select(Job.id)
        .where(
            or_(
                (Job.status == "queued")
                & Job.cancel_requested.is_(False)
                & (Job.enqueued_at.is_(None) | (Job.enqueued_at < enqueued_before)),
                (Job.status == "running") & (Job.lease_expires_at < now),
            )
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def mark_enqueued(session: Session, job_id: str, queue: str | None = None) -> None:
    values: dict[str, Any] = {"enqueued_at": utcnow()}
    if queue is not None:
        values["queue"] = queue
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def delete_job(session: Session, job_id: str) -> None:
    session.execute(delete(Job).where(Job.id == job_id))


# --- artifacts ----------------------------------------------------------------------------------


def get_artifact(session: Session, tenant: str, artifact_id: str) -> Artifact | None:
    return session.scalar(
        select(Artifact).where(Artifact.id == artifact_id, Artifact.tenant == tenant)
    )
