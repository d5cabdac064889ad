"""The claim rules of the worker's lifecycle, against a real (SQLite) database, in-process."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from core.pipeline import PipelineResult
from shears.db import repository as repo
from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from shears.db.tables import Job, Model, new_id, utcnow
from shears.settings import get_settings
from shears.storage import storage_from_settings
from tests.api.rows import METRICS


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


def _result(tmp_path: Path) -> PipelineResult:
    report = tmp_path / "report.json"
    report.write_text("{}")
    return PipelineResult(metrics=METRICS, layers=(), format="pt2", report_path=report)


@pytest.mark.parametrize("owned", [True, False])
def test_a_success_is_committed_with_the_fine_tuning_checkpoint_already_gone(
    sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owned: bool
) -> None:
    """A client that reads "succeeded" finds no checkpoint in storage: it is deleted inside the
    transaction that records the success (once it wrote the job's row, so no other attempt
    holds it). An attempt that lost the job leaves the checkpoint to the one that took it."""
    from worker import db, lifecycle

    monkeypatch.setattr(lifecycle, "_announce", lambda *_: None)  # no broker in this test
    monkeypatch.setattr(db, "_sessions", None)  # an engine on this test's database
    monkeypatch.setattr(db, "_engine", None)
    job_id = add_job(sessions)
    with sessions.begin() as session:
        assert repo.claim_job(session, job_id, lease_seconds=60) == 1
    if not owned:
        with sessions.begin() as session:
            session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
        with sessions.begin() as session:
            assert repo.claim_job(session, job_id, lease_seconds=60) == 2
    storage = storage_from_settings(get_settings())
    checkpoint_dir = f"checkpoints/default/{job_id}"
    saved = tmp_path / "fine_tune.pt"
    saved.write_bytes(b"state")
    storage.put_file(saved, f"{checkpoint_dir}/fine_tune.pt")
    assert storage.size(f"{checkpoint_dir}/fine_tune.pt") == 5

    stored: list = []
    record = lifecycle._record_success
    args = (job_id, 1, "default", _result(tmp_path), storage, stored, checkpoint_dir)
    if owned:
        record(*args)
    else:
        with pytest.raises(lifecycle.Cancelled):
            record(*args)
    with sessions() as session:
        assert session.get(Job, job_id).status == ("succeeded" if owned else "running")
    assert storage.size(f"{checkpoint_dir}/fine_tune.pt") == (None if owned else 5)
    assert db._engine is not None
    db._engine.dispose()
