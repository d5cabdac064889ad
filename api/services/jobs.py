"""Jobs: submit, read, list, cancel and delete.

Nothing here commits and nothing publishes: the route commits once, then publishes the job it got
back (``worker.publish.publish_job``), so a worker never hears of a row that does not exist.
Refusals are :mod:`api.services.errors`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from api.schemas import JobCreate
from api.services.errors import (
    Conflict,
    Gone,
    IdempotencyMismatch,
    InvalidField,
    NotFound,
    QueueFull,
)
from api.services.events import parse_cursor
from core.errors import InvalidSpec
from core.pipeline import check_recovery
from core.pruning import preflight as pruning_preflight
from core.search import scan_reads_targets
from core.search.targets import check_target
from core.spec import SPEC_VERSION
from shears.db import repository as repo
from shears.db.tables import Artifact, Job, JobEvent, JobLayer, Model, new_id, utcnow
from shears.jobspec import FineTuneRequest, JobSpecRequest
from shears.storage import Storage


@dataclass(frozen=True)
class Submitted:
    """The job a ``POST /v1/jobs`` stands for; ``created`` False when an earlier request with the
    same ``Idempotency-Key`` made it (then there is nothing new to publish)."""

    job: Job
    created: bool


def submit(
    session: Session,
    tenant: str,
    body: JobCreate,
    *,
    idempotency_key: str | None,
    max_queued: int,
) -> Submitted:
    """Check the request against the model, the datasets and the tenant's queue, and add the job
    (``queued``) with its first event. With an ``Idempotency-Key`` seen before, the same body gets
    the earlier job back (a retried POST never makes a second job); another body is refused.

    Raises:
        NotFound: no such model or dataset. InvalidField: the spec does not fit the model's
            layers, or a dataset lacks the targets a section reads. QueueFull: the tenant has
            ``max_queued`` queued jobs. IdempotencyMismatch: the key came with another body.
    """
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        earlier = repo.job_by_idempotency_key(session, tenant, idempotency_key)
        if earlier is not None:
            return _replay(earlier, request_hash)
    model = repo.get_model(session, tenant, body.model_id)
    if model is None:
        raise NotFound("model", body.model_id)
    spec = body.spec()
    _preflight(spec, model)
    if repo.count_queued(session, tenant) >= max_queued:
        raise QueueFull(max_queued)
    _check_datasets(session, tenant, spec, model.format)
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        model_id=model.id,
        name=body.name,
        status="queued",
        spec=spec.stored(),
        spec_version=SPEC_VERSION,
        attempts=0,
        progress_stage="queued",
        progress_fraction=0.0,
        cancel_requested=False,
        created_at=utcnow(),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    repo.add_event(session, job.id, "queued", "job accepted")
    try:
        session.flush()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer as it did. The
        # failed insert spoils the transaction, which holds nothing else: roll it back.
        session.rollback()
        earlier = repo.job_by_idempotency_key(session, tenant, idempotency_key or "")
        if earlier is None:
            raise
        return _replay(earlier, request_hash)
    return Submitted(job, created=True)


def _preflight(spec: JobSpecRequest, model: Model) -> None:
    """Refuse, before anything is queued, a spec that cannot apply to the model: no pruner for
    its format and granularity, a criterion of another format, an exclude or override that
    matches nothing, a global cap that cannot be met, an evaluation or loss the format cannot
    do -- the checks the worker would otherwise fail the job with, minutes later. The same
    allocator and pruner registry decide as in the worker (``core.pipeline.preflight``)."""
    layers = {layer["name"]: layer["params"] for layer in model.prunable_layers}
    core_spec, _ = spec.to_core()
    try:
        pruning_preflight(model.format, core_spec.pruning, layers)
    except InvalidSpec as exc:
        raise InvalidField(("pruning",), exc.message) from exc
    try:
        check_recovery(model.format, core_spec)
    except InvalidSpec as exc:
        raise InvalidField((exc.field or "pruning",), exc.message) from exc
    try:
        check_target(model.format, core_spec)
    except InvalidSpec as exc:
        # A core field may be a dotted path into the spec ("pruning.search.grid").
        where = (
            ("pruning", "target") if exc.field in (None, "pruning") else tuple(exc.field.split("."))
        )
        raise InvalidField(where, exc.message) from exc


def _check_datasets(session: Session, tenant: str, spec: JobSpecRequest, fmt: str) -> None:
    """Each dataset the spec names exists (NotFound) and has the targets its section reads (a
    scan of a language model scores perplexity on text: its search data needs none)."""
    for name, section in spec.datasets().items():
        assert section.dataset_id is not None  # datasets() lists the sections that name one
        dataset = repo.get_dataset(session, tenant, section.dataset_id)
        if dataset is None:
            raise NotFound("dataset", section.dataset_id)
        needs = getattr(section, "needs_targets", False)
        if name == "search" and needs:
            needs = scan_reads_targets(fmt)
        if needs and not dataset.has_targets:
            what = f"loss {section.loss!r}" if isinstance(section, FineTuneRequest) else "it"
            raise InvalidField(
                (name, "dataset_id"),
                f"{name} needs a dataset with targets ({what} reads them); dataset "
                f"{dataset.id!r} has none. Upload one with 'targets', or use "
                + ("loss 'distillation' with alpha 1." if name == "fine_tune" else "another."),
            )


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, request_hash: str) -> Submitted:
    if job.request_hash != request_hash:
        raise IdempotencyMismatch()
    return Submitted(job, created=False)


def get(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job (NotFound for another tenant's id, as for an unknown one)."""
    job = repo.get_job(session, tenant, job_id)
    if job is None:
        raise NotFound("job", job_id)
    return job


def poll(reads: Engine, tenant: str, job_id: str) -> tuple[Row[Any], list[repo.ArtifactSummary]]:
    """The status poll's read: the job's columns and its artifacts in one statement on the
    autocommit engine ``reads`` (no ORM, no transaction)."""
    try:
        with reads.connect() as connection:
            found = repo.job_with_artifacts(connection, tenant, job_id)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        # The database dropped this pooled connection (a restart): the pool has discarded it and
        # its siblings, so one retry reconnects, as a pre-ping would have. Down: 503 as before.
        with reads.connect() as connection:
            found = repo.job_with_artifacts(connection, tenant, job_id)
    if found is None:
        raise NotFound("job", job_id)
    return found


def list_jobs(
    session: Session,
    tenant: str,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    model_id: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first; raises ``repo.InvalidCursor`` for a cursor this service did not hand out."""
    return repo.list_jobs(session, tenant, limit, cursor, status, model_id)


def layers(session: Session, tenant: str, job_id: str) -> Sequence[JobLayer]:
    return repo.job_layers(session, get(session, tenant, job_id).id)


def events(
    session: Session, tenant: str, job_id: str, limit: int, cursor: str | None
) -> tuple[list[JobEvent], str | None]:
    """Oldest first, and the cursor of the next page (None on the last)."""
    job = get(session, tenant, job_id)
    after = parse_cursor(cursor) if cursor is not None else None
    items, last = repo.job_events(session, job.id, limit, after)
    return items, str(last) if last is not None else None


def cancel(session: Session, tenant: str, job_id: str) -> Job:
    """Cancel a queued job at once; ask a running one to stop (the worker ends it)."""
    job = get(session, tenant, job_id)
    outcome = repo.request_cancel(session, job.id)
    if outcome is None:
        raise Conflict(
            "job-finished", "Job already finished", f"The job is {job.status}; nothing to cancel."
        )
    if outcome == "cancelled":
        repo.add_event(
            session, job.id, "done", "cancelled before it started", {"status": "cancelled"}
        )
    else:
        repo.add_event(session, job.id, job.progress_stage, "cancel requested")
    session.flush()
    session.refresh(job)
    return job


def delete(session: Session, tenant: str, job_id: str) -> list[str]:
    """Delete a finished job with its events, layers and artifact rows; returns the storage keys
    of its artifacts, for the caller to remove once the deletion is committed."""
    job = get(session, tenant, job_id)
    if job.status in repo.ACTIVE_STATUSES:
        raise Conflict(
            "job-active", "Job still active", "Cancel the job first, or wait for it to finish."
        )
    keys = [a.storage_key for a in job.artifacts]
    repo.delete_job(session, job.id)
    return keys


def artifact_file(
    session: Session, storage: Storage, tenant: str, artifact_id: str
) -> tuple[Artifact, int]:
    """The tenant's artifact and its stored size (Gone when the row outlived the file)."""
    artifact = repo.get_artifact(session, tenant, artifact_id)
    if artifact is None:
        raise NotFound("artifact", artifact_id)
    size = storage.size(artifact.storage_key)
    if size is None:
        raise Gone("artifact", "The artifact's file no longer exists.")
    return artifact, size
