"""A job's events as a stream: every stored event once, in order, with progress changes between
them, until the job's final event.

Progress is not stored as events (the worker writes ``jobs.progress_*`` every half second while it
trains; events are the stage changes, retries and the end, and the JSON route pages them). So the
stream reads both on each poll: the job's state, then its events after the last one sent. A stored
event becomes a message ``event: <stage>``, ``id: <event id>``; a changed state becomes
``event: progress`` carrying the id of the last event sent, so that ``Last-Event-ID`` always names
a stored event and a resumed stream sends every later event, then the state as it is then.

No HTTP here: the route turns each :class:`StreamMessage` into a Server-Sent Event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import structlog
from pydantic import TypeAdapter
from sqlalchemy import Engine, Row
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from api.schemas import StreamEventOut, StreamProgressOut
from api.services.errors import NotFound
from shears.db import repository as repo

log = structlog.get_logger("shears.api")

FINISHED = frozenset({"succeeded", "failed", "cancelled"})
# Events read per poll; a job with more (a long fine-tune's epochs) is read on without waiting.
_BATCH = 200

_EVENT: TypeAdapter[StreamEventOut] = TypeAdapter(StreamEventOut)
_PROGRESS: TypeAdapter[StreamProgressOut] = TypeAdapter(StreamProgressOut)


@dataclass(frozen=True)
class StreamMessage:
    """One message of the stream: its name, the id a client resumes after, its JSON."""

    event: str
    id: str | None
    data: str


@dataclass(frozen=True)
class Snapshot:
    """One poll: the job's status and progress, then its events after the cursor."""

    status: str
    stage: str
    fraction: float
    events: Sequence[Row[Any]]


def read(reads: Engine, tenant: str, job_id: str, after: int) -> Snapshot | None:
    """The job's state and up to a batch of events with ids above ``after``, on the autocommit
    engine ``reads``; None when the tenant has no such job (or it was deleted)."""
    try:
        with reads.connect() as connection:
            found = repo.job_state_and_events(connection, tenant, job_id, after, _BATCH)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        # A pooled connection the database dropped (a restart): one retry reconnects, as for the
        # status poll, which shares this pool.
        with reads.connect() as connection:
            found = repo.job_state_and_events(connection, tenant, job_id, after, _BATCH)
    if found is None:
        return None
    state, events = found
    return Snapshot(state.status, state.progress_stage, state.progress_fraction, events)


class EventStream:
    """Follows one job for one client. ``open`` checks the job exists for the tenant (NotFound
    otherwise, before any byte is sent); iterating yields messages until the job's final event.

    Each poll is one short hop to a worker thread under ``limiter`` (the status poll's), then an
    ``anyio.sleep``: an open stream holds no thread and no connection while it waits."""

    def __init__(
        self,
        reads: Engine,
        limiter: anyio.CapacityLimiter,
        tenant: str,
        job_id: str,
        after: int,
        poll_seconds: float,
    ) -> None:
        self._reads = reads
        self._limiter = limiter
        self._tenant = tenant
        self._job_id = job_id
        self._after = after
        self._poll = poll_seconds
        self._first: Snapshot | None = None

    async def _read(self) -> Snapshot | None:
        return await anyio.to_thread.run_sync(
            read, self._reads, self._tenant, self._job_id, self._after, limiter=self._limiter
        )

    async def open(self) -> EventStream:
        self._first = await self._read()
        if self._first is None:
            raise NotFound("job", self._job_id)
        return self

    @property
    def exhausted(self) -> bool:
        """The job is finished and every event was sent before (a resume after the end): the
        answer is 204, which tells an ``EventSource`` to stop reconnecting."""
        first = self._first
        return first is not None and first.status in FINISHED and not first.events

    async def __aiter__(self) -> AsyncIterator[StreamMessage]:
        snapshot, self._first = self._first, None
        sent: tuple[str, str, float] | None = None
        while snapshot is not None:
            state = (snapshot.status, snapshot.stage, snapshot.fraction)
            if state != sent:
                sent = state
                yield self._progress(snapshot)
            for event in snapshot.events:
                self._after = event.id
                yield StreamMessage(
                    event.stage,
                    str(event.id),
                    _EVENT.dump_json(_EVENT.validate_python(event, from_attributes=True)).decode(),
                )
            if len(snapshot.events) < _BATCH:
                # The state was read before the events: a final state means the final event,
                # committed with it, has just been sent.
                if snapshot.status in FINISHED:
                    return
                await anyio.sleep(self._poll)
            try:
                snapshot = await self._read()  # None: the job was deleted; the stream ends
            except SQLAlchemyError as exc:
                # The database went away mid-stream: end it cleanly (no final event), so that
                # the client reconnects with Last-Event-ID and is told 503 until it is back.
                log.warning("event stream ended: database error", error=str(exc))
                return

    def _progress(self, snapshot: Snapshot) -> StreamMessage:
        body = StreamProgressOut.model_validate(
            {"status": snapshot.status, "stage": snapshot.stage, "fraction": snapshot.fraction}
        )
        return StreamMessage(
            "progress",
            str(self._after) if self._after else None,
            _PROGRESS.dump_json(body).decode(),
        )


def parse_cursor(value: str) -> int:
    """An event id as a client sends it back (``Last-Event-ID`` or ``cursor``); anything else is
    a cursor this service did not hand out."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise repo.InvalidCursor(value)
    return int(value)
