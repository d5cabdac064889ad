"""``/v1/jobs``: submit, follow, cancel and delete pruning jobs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Annotated, Any

import anyio.to_thread
import structlog
from celery import Celery
from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import TypeAdapter
from sqlalchemy import Engine, Row
from sqlalchemy.exc import DBAPIError, IntegrityError

from api.deps import CeleryDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import Problem, invalid_field, not_found
from api.schemas import EventList, JobCreate, JobList, JobOut, JobStatus, LayerList
from core.allocation import allocate
from core.errors import InvalidSpec
from core.spec import SPEC_VERSION, JobSpec
from shears.db import repository as repo
from shears.db.tables import Artifact, Job, new_id, utcnow
from shears.jobspec import (
    CalibrationRequest,
    EvaluationRequest,
    FineTuneRequest,
    core_section,
    stored_spec,
)
from worker.celery_app import RUN_JOB_TASK

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = structlog.get_logger("shears.api")


def job_body(
    job: Job | Row[Any], artifacts: Iterable[Artifact | repo.ArtifactSummary]
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


def enqueue(celery: Celery, job_id: str) -> bool:
    """Publish the job's id; the task id is the job id. False when the broker is unreachable:
    the row stays queued and the sweeper publishes it later."""
    try:
        celery.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id)
    except Exception:
        log.warning("enqueue failed; the sweeper will retry", job_id=job_id, exc_info=True)
        return False
    return True


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, request_hash: str, response: Response) -> dict[str, Any]:
    if job.request_hash != request_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a new job.",
        )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_body(job, job.artifacts)


@router.post("", status_code=202, response_model=JobOut, responses={404: {}, 422: {}, 429: {}})
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    celery: CeleryDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict[str, Any]:
    """Validate, store the job, then enqueue it. With an ``Idempotency-Key``, the same key and
    body return the first response again (a retried POST never makes a second job)."""
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        earlier = repo.job_by_idempotency_key(session, tenant, idempotency_key)
        if earlier is not None:
            return _replay(earlier, request_hash, response)
    model = repo.get_model(session, tenant, body.model_id)
    if model is None:
        raise not_found("model", body.model_id)
    try:
        allocate(body.pruning, {layer["name"]: layer["params"] for layer in model.prunable_layers})
    except InvalidSpec as exc:
        raise invalid_field(["body", "pruning"], exc.message) from exc

    if repo.count_queued(session, tenant) >= settings.max_queued_jobs_per_tenant:
        raise Problem(
            429,
            "too-many-queued-jobs",
            "Too many queued jobs",
            f"This tenant already has {settings.max_queued_jobs_per_tenant} queued jobs; "
            "retry when some have started.",
            headers={"Retry-After": "30"},
        )
    datasets = _dataset_sections(session, tenant, body)
    spec = JobSpec(
        pruning=body.pruning,
        dry_run=body.dry_run,
        **{section: core_section(section, request) for section, request in datasets.items()},
    )
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        model_id=model.id,
        name=body.name,
        status="queued",
        spec=stored_spec(spec, {section: r.dataset_id for section, r in datasets.items()}),
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
        session.commit()  # the row is the truth: it exists before any worker can hear of it
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer as it did.
        session.rollback()
        earlier = repo.job_by_idempotency_key(session, tenant, idempotency_key or "")
        if earlier is None:
            raise
        return _replay(earlier, request_hash, response)
    if enqueue(celery, job.id):
        job.enqueued_at = utcnow()
        session.commit()
    session.refresh(job)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_body(job, job.artifacts)


_DatasetRequest = CalibrationRequest | FineTuneRequest | EvaluationRequest


def _dataset_sections(
    session: SessionDep, tenant: str, body: JobCreate
) -> dict[str, _DatasetRequest]:
    """The body's sections that name a dataset, after checking each exists (404) and has the
    targets its loss or metric reads (422)."""
    sections: dict[str, _DatasetRequest] = {
        name: request
        for name, request in (
            ("calibration", body.calibration),
            ("fine_tune", body.fine_tune),
            ("evaluation", body.evaluation),
        )
        if request is not None
    }
    for name, request in sections.items():
        dataset = repo.get_dataset(session, tenant, request.dataset_id)
        if dataset is None:
            raise not_found("dataset", request.dataset_id)
        needs_targets = getattr(request, "needs_targets", False)
        if needs_targets and not dataset.has_targets:
            what = f"loss {request.loss!r}" if isinstance(request, FineTuneRequest) else "it"
            raise invalid_field(
                ["body", name, "dataset_id"],
                f"{name} needs a dataset with targets ({what} reads them); dataset "
                f"{dataset.id!r} has none. Upload one with 'targets', or use "
                + ("loss 'distillation' with alpha 1." if name == "fine_tune" else "another."),
            )
    return sections


def _get(session: SessionDep, tenant: str, job_id: str) -> Job:
    job = repo.get_job(session, tenant, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


_JOB_OUT: TypeAdapter[JobOut] = TypeAdapter(JobOut)


def _job_json(reads: Engine, tenant: str, job_id: str) -> bytes | None:
    """The job's body as JSON bytes, validated against ``JobOut`` exactly as ``response_model``
    would; None when the tenant has no such job."""
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
        return None
    return _JOB_OUT.dump_json(_JOB_OUT.validate_python(job_body(*found)))


def _etag(body: bytes) -> str:
    """A strong validator from the body itself: it changes whenever anything in the job does
    (status, progress, metrics, artifacts) and never otherwise."""
    return f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'


def _none_match(if_none_match: str, etag: str) -> bool:
    """RFC 9110 If-None-Match: ``*`` or a list of entity tags, compared weakly."""
    if if_none_match.strip() == "*":
        return True
    return etag in {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses={
        304: {"description": "Not modified: the job is still as the `If-None-Match` ETag says."},
        404: {},
    },
)
async def get_job(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    if_none_match: Annotated[
        str | None,
        Header(description="An `ETag` from an earlier answer: 304, no body, while unchanged."),
    ] = None,
) -> Response:
    """The job: its status, progress, metrics and artifacts. The `ETag` changes whenever any of
    them does; poll with `If-None-Match` to get a bodiless 304 while nothing has."""
    # The status poll, the hottest route: one statement (job and artifacts) on an autocommit
    # connection, all of its blocking work in one worker-thread hop, and the body serialised once
    # (the same JobOut validation and JSON that response_model gives the other routes). The 304
    # is decided after the tenant-scoped lookup: another tenant's id is a 404 whatever it sends.
    body = await anyio.to_thread.run_sync(
        _job_json, request.app.state.reads, tenant, job_id, limiter=request.app.state.read_limiter
    )
    if body is None:
        raise not_found("job", job_id)
    etag = _etag(body)
    # private: the body is one tenant's; no-cache: a running job changes, so always revalidate.
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match is not None and _none_match(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
    status: JobStatus | None = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    items, next_cursor = repo.list_jobs(session, tenant, limit, cursor, status, model_id)
    return {"items": [job_body(j, j.artifacts) for j in items], "next_cursor": next_cursor}


@router.get("/{job_id}/layers", response_model=LayerList)
def get_layers(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _get(session, tenant, job_id)
    return {"items": list(repo.job_layers(session, job.id))}


@router.get("/{job_id}/events", response_model=EventList)
def get_events(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    job = _get(session, tenant, job_id)
    after: int | None = None
    if cursor is not None:
        if not cursor.isdigit():
            raise Problem(400, "invalid-cursor", "Invalid cursor", "Use the next_cursor returned.")
        after = int(cursor)
    items, last = repo.job_events(session, job.id, limit, after)
    return {"items": items, "next_cursor": str(last) if last is not None else None}


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses={409: {}})
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _get(session, tenant, job_id)
    outcome = repo.request_cancel(session, job.id)
    if outcome is None:
        raise Problem(
            409,
            "job-finished",
            "Job already finished",
            f"The job is {job.status}; nothing to cancel.",
        )
    if outcome == "cancelled":
        repo.add_event(
            session, job.id, "done", "cancelled before it started", {"status": "cancelled"}
        )
    else:
        repo.add_event(session, job.id, job.progress_stage, "cancel requested")
    session.commit()
    session.refresh(job)
    return job_body(job, job.artifacts)


@router.delete("/{job_id}", status_code=204, responses={409: {}})
def delete_job(
    job_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    job = _get(session, tenant, job_id)
    if job.status in repo.ACTIVE_STATUSES:
        raise Problem(
            409, "job-active", "Job still active", "Cancel the job first, or wait for it to finish."
        )
    keys = [a.storage_key for a in job.artifacts]
    repo.delete_job(session, job.id)
    session.commit()
    for key in keys:
        storage.delete(key)
    return Response(status_code=204)
