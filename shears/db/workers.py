"""Worker heartbeats: each worker process announces the queues it consumes and renews that while
it runs. A row older than the job lease is a worker that is gone (killed, or its host lost)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from shears.db.tables import WorkerHeartbeat, utcnow


def announce(
    session: Session, worker: str, queues: list[str], host: str, pid: int, concurrency: int
) -> None:
    """Insert or renew one row per queue of ``worker`` (only this process writes its rows)."""
    now = utcnow()
    for queue in queues:
        renewed = session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.worker == worker, WorkerHeartbeat.queue == queue)
            .values(seen_at=now)
        )
        if getattr(renewed, "rowcount", 0) == 0:
            session.add(
                WorkerHeartbeat(
                    worker=worker,
                    queue=queue,
                    host=host,
                    pid=pid,
                    concurrency=concurrency,
                    started_at=now,
                    seen_at=now,
                )
            )


def forget(session: Session, worker: str) -> None:
    """A worker shutting down cleanly takes its rows with it: no job waits for its lease."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker == worker))


def queue_alive(session: Session, queue: str, seen_after: datetime) -> bool:
    """Whether some worker consuming ``queue`` has renewed its heartbeat since ``seen_after``."""
    return bool(
        session.scalar(
            select(
                exists().where(WorkerHeartbeat.queue == queue, WorkerHeartbeat.seen_at > seen_after)
            )
        )
    )


def prune(session: Session, seen_before: datetime) -> None:
    """Drop rows of workers long gone, so the table stays the size of the fleet."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < seen_before))


def alive(session: Session, seen_after: datetime) -> list[WorkerHeartbeat]:
    return list(
        session.scalars(
            select(WorkerHeartbeat)
            .where(WorkerHeartbeat.seen_at > seen_after)
            .order_by(WorkerHeartbeat.worker, WorkerHeartbeat.queue)
        )
    )
