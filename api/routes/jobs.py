"""``/v1/jobs``: submit, follow, cancel and delete pruning jobs. Thin: parse, call
:mod:`api.services.jobs`, commit once, shape the response; publishing comes after the commit."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import CeleryDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.openapi import EVENTS_RESPONSES
from api.schemas import EventList, JobCreate, JobList, JobOut, JobStatus, LayerList
from api.services import jobs
from api.services.events import EventStream, parse_cursor
from shears.jobview import job_body
from worker.notify import publish_job_event
from worker.publish import publish_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut, responses={404: {}, 422: {}, 429: {}})
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    celery: CeleryDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict[str, Any]:
    """Validate, store the job, then enqueue it. With an ``Idempotency-Key``, the same key and
    body return the first response again (a retried POST never makes a second job)."""
    submitted = jobs.submit(
        session,
        tenant,
        body,
        idempotency_key=idempotency_key,
        max_queued=settings.max_queued_jobs_per_tenant,
    )
    session.commit()  # the row is the truth: it exists before any worker can hear of it
    job = submitted.job
    if submitted.created:
        publish_job(celery, request.app.state.sessions, job.id, settings)
        session.refresh(job)  # publish_job recorded the queue in a transaction of its own
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_body(job, job.artifacts)


_JOB_OUT: TypeAdapter[JobOut] = TypeAdapter(JobOut)


def _job_json(request: Request, tenant: str, job_id: str) -> bytes:
    """The job's body as JSON bytes, validated against ``JobOut`` exactly as ``response_model``
    would."""
    found = jobs.poll(request.app.state.reads, tenant, job_id)
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
        _job_json, request, tenant, job_id, limiter=request.app.state.read_limiter
    )
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
    items, next_cursor = jobs.list_jobs(session, tenant, limit, cursor, status, model_id)
    return {"items": [job_body(j, j.artifacts) for j in items], "next_cursor": next_cursor}


@router.get("/{job_id}/layers", response_model=LayerList)
def get_layers(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return {"items": list(jobs.layers(session, tenant, job_id))}


@router.get("/{job_id}/events", response_model=EventList, responses=EVENTS_RESPONSES)
async def get_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None,
        Query(
            description="The `next_cursor` of the previous page; with `text/event-stream`, an "
            "event id to start after (as `Last-Event-ID`).",
            json_schema_extra={"pattern": "^[0-9]{1,18}$"},
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="With `text/event-stream`: resume after this event id (an `EventSource` "
            "sends it when it reconnects). Anything but an event id is a 400.",
            json_schema_extra={"pattern": "^[0-9]{1,18}$"},
        ),
    ] = None,
) -> Any:
    """The job's events, oldest first: a page of JSON, or with `Accept: text/event-stream` a
    stream of Server-Sent Events that ends after the job's final event."""
    resume = parse_cursor(last_event_id) if last_event_id is not None else None
    if not _wants_event_stream(request.headers.get("accept")):
        return await run_in_threadpool(_events_page, request, tenant, job_id, limit, cursor)
    if resume is None and cursor is not None:
        resume = parse_cursor(cursor)
    stream = await EventStream(
        request.app.state.reads,
        request.app.state.read_limiter,
        tenant,
        job_id,
        resume or 0,
        settings.events_poll_seconds,
    ).open()
    if stream.exhausted:
        return Response(status_code=204)
    return EventSourceResponse(
        (ServerSentEvent(m.data, event=m.event, id=m.id) async for m in stream),
        ping=settings.events_keepalive_seconds,
        headers={"Cache-Control": "private, no-cache", "X-Accel-Buffering": "no"},
    )


def _wants_event_stream(accept: str | None) -> bool:
    """Whether ``Accept`` prefers ``text/event-stream`` to JSON (``*/*`` or none: JSON, the
    route's form before the stream existed)."""
    weights: dict[str, float] = {}
    for media_range in (accept or "").split(","):
        kind, *params = (part.strip() for part in media_range.split(";"))
        q = next((p.partition("=")[2] for p in params if p.replace(" ", "").startswith("q=")), "1")
        try:
            weights[kind.lower()] = float(q)
        except ValueError:
            weights[kind.lower()] = 0.0
    sse = weights.get("text/event-stream", 0.0)
    return sse > 0 and sse >= weights.get("application/json", 0.0)


def _events_page(
    request: Request, tenant: str, job_id: str, limit: int, cursor: str | None
) -> dict[str, Any]:
    with request.app.state.sessions() as session:
        items, next_cursor = jobs.events(session, tenant, job_id, limit, cursor)
        return {"items": items, "next_cursor": next_cursor}


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses={409: {}})
def cancel_job(
    job_id: str, request: Request, session: SessionDep, celery: CeleryDep, tenant: TenantDep
) -> dict[str, Any]:
    job = jobs.cancel(session, tenant, job_id)
    session.commit()
    if job.status == "cancelled":  # a queued job ends here; a running one, in its worker
        publish_job_event(celery, request.app.state.sessions, job.id, "job.cancelled")
    return job_body(job, job.artifacts)


@router.delete("/{job_id}", status_code=204, responses={409: {}})
def delete_job(
    job_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    keys = jobs.delete(session, tenant, job_id)
    session.commit()
    for key in keys:  # only once the rows are gone: a failed commit leaves the files in place
        storage.delete(key)
    return Response(status_code=204)
