"""Queries of the sensitivity scan's cells: created once per job, claimed with a lease by any
worker, finished once. Every write is one conditional statement, so two workers racing for a cell,
or a worker whose lease ran out, can never both record it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shears.db.tables import Job, ScanCell, utcnow


def ensure_cells(session: Session, job_id: str, units: Sequence[str], grid: Sequence[float]) -> int:
    """Add the cells of ``units`` x ``grid`` that the job does not have yet (a resumed job keeps
    its finished ones); returns how many were added."""
    have = set(
        session.execute(select(ScanCell.unit, ScanCell.ratio).where(ScanCell.job_id == job_id))
    )
    added = [
        ScanCell(job_id=job_id, position=i, unit=unit, ratio=ratio, status="pending", attempts=0)
        for i, unit in enumerate(units)
        for ratio in grid
        if (unit, ratio) not in have
    ]
    session.add_all(added)
    return len(added)


def _claimable(job_id: str) -> Any:
    return (ScanCell.job_id == job_id) & or_(
        ScanCell.status == "pending",
        (ScanCell.status == "running") & (ScanCell.lease_expires_at < utcnow()),
    )


def claim_cell(session: Session, job_id: str, worker: str, lease_seconds: float) -> ScanCell | None:
    """Take the job's next pending cell (or one whose worker's lease ran out) for ``worker``;
    None when there is none to take. Only while the job itself is running."""
    running = session.scalar(select(Job.status).where(Job.id == job_id)) == "running"
    if not running:
        return None
    candidates = session.scalars(
        select(ScanCell.id)
        .where(_claimable(job_id))
        .order_by(ScanCell.position, ScanCell.ratio)
        .limit(8)
    ).all()
    for cell_id in candidates:
        result = session.execute(
            update(ScanCell)
            .where(ScanCell.id == cell_id, _claimable(job_id))
            .values(
                status="running",
                worker=worker,
                attempts=ScanCell.attempts + 1,
                lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
            )
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) == 1:
            return session.get(ScanCell, cell_id)
    return None


def _held(cell_id: int, worker: str, attempts: int) -> Any:
    return (
        (ScanCell.id == cell_id)
        & (ScanCell.status == "running")
        & (ScanCell.worker == worker)
        & (ScanCell.attempts == attempts)
    )


def renew_cell(
    session: Session, cell_id: int, worker: str, attempts: int, lease_seconds: float
) -> bool:
    result = session.execute(
        update(ScanCell)
        .where(_held(cell_id, worker, attempts))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    return getattr(result, "rowcount", 0) == 1


def finish_cell(
    session: Session, cell_id: int, worker: str, attempts: int, scores: dict[str, float]
) -> bool:
    """Record a cell's scores; False when another worker took it over meanwhile."""
    result = session.execute(
        update(ScanCell)
        .where(_held(cell_id, worker, attempts))
        .values(status="done", scores=scores, finished_at=utcnow(), lease_expires_at=None)
    )
    return getattr(result, "rowcount", 0) == 1


def cells(session: Session, job_id: str) -> Sequence[ScanCell]:
    """The job's cells in graph order, then by ratio."""
    return session.scalars(
        select(ScanCell)
        .where(ScanCell.job_id == job_id)
        .order_by(ScanCell.position, ScanCell.ratio)
    ).all()


def set_search(session: Session, job_id: str, attempt: int | None, search: dict[str, Any]) -> bool:
    """Write the job's search summary; with ``attempt``, only while that attempt owns the job."""
    condition = Job.id == job_id
    if attempt is not None:
        condition = condition & (Job.status == "running") & (Job.attempts == attempt)
    result = session.execute(update(Job).where(condition).values(search=search))
    return getattr(result, "rowcount", 0) == 1
