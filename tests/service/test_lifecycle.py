"""The claim rules of the worker's lifecycle, against a real (SQLite) database, in-process."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from shears.db import repository as repo
from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from shears.db.tables import Job, Model, new_id, utcnow
from shears.settings import get_settings


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    monkeypatch.setenv("SHEARS_DATABASE_URL", url)
    monkeypatch.setenv("SHEARS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SHEARS_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()
    get_settings.cache_clear()


def add_job(sessions, model_format: str = "pt2", **values) -> str:
    with sessions.begin() as session:
        model = Model(
            id=new_id("mdl"),
            tenant="default",
            name="m",
            format=model_format,
            size_bytes=1,
            sha256="0",
            num_parameters=1,
            inputs=[],
            prunable_layers=[],
            storage_key="models/x.pt2",
            created_at=utcnow(),
        )
        session.add(model)
        session.flush()  # no ORM relationship orders the inserts: the model must exist first
        job = Job(
            id=new_id("job"),
            tenant="default",
            model_id=model.id,
            spec_version=1,
            progress_stage="queued",
            progress_fraction=0.0,
            cancel_requested=False,
            created_at=utcnow(),
            **{"status": "queued", "attempts": 0, "spec": {}, **values},
        )
        session.add(job)
        return job.id


def test_a_live_job_is_never_claimed_twice(sessions) -> None:
    job_id = add_job(sessions)
    with sessions.begin() as session:
        assert repo.claim_job(session, job_id, lease_seconds=60) == 1
    with sessions.begin() as session:
        assert repo.claim_job(session, job_id, lease_seconds=60) is None


def test_an_expired_lease_is_taken_over_and_the_old_attempt_can_write_nothing(sessions) -> None:
    job_id = add_job(sessions)
    with sessions.begin() as session:
        assert repo.claim_job(session, job_id, lease_seconds=60) == 1
    with sessions.begin() as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    with sessions.begin() as session:
        assert repo.claim_job(session, job_id, lease_seconds=60) == 2
    with sessions.begin() as session:
        assert repo.renew_lease(session, job_id, 1, 60) is None  # the zombie learns it lost
        assert not repo.finish_job(session, job_id, 1, "succeeded", {})
        assert repo.finish_job(session, job_id, 2, "succeeded", {})


def test_finished_and_cancelled_jobs_are_not_claimable(sessions) -> None:
    done = add_job(sessions, status="succeeded")
    cancelled = add_job(sessions)
    with sessions.begin() as session:
        assert repo.request_cancel(session, cancelled) == "cancelled"
    with sessions.begin() as session:
        assert repo.claim_job(session, done, 60) is None
        assert repo.claim_job(session, cancelled, 60) is None


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(sessions) -> None:
    from worker import lifecycle

    # Two attempts already started and died (their leases expired): the third delivery gives up.
    job_id = add_job(
        sessions, status="running", attempts=2, lease_expires_at=utcnow() - timedelta(seconds=1)
    )
    lifecycle.run_job(job_id)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "failed"
        assert job.error_type == "too_many_attempts"
        assert "limit 2" in job.error_message
        assert job.attempts == 3
