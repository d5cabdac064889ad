"""Jobs whose message never reached the broker are not lost: the sweeper publishes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from core.spec import SPEC_VERSION, JobSpec, PruningSpec
from shears.db.engine import make_engine
from shears.db.tables import new_id, utcnow
from tests.e2e.service import Service
from tests.e2e.test_walkthrough import upload

pytestmark = pytest.mark.e2e


def test_a_job_never_published_is_swept_and_runs(service: Service, resnet_pt2: Path) -> None:
    model = upload(service, resnet_pt2)
    spec = JobSpec(pruning=PruningSpec(criterion="l2", granularity="unstructured", sparsity=0.3))
    job_id = new_id("job")
    # What POST /v1/jobs leaves behind when the broker is down: the row, committed, never published.
    engine = make_engine(service.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant, model_id, status, spec, spec_version, attempts,"
                    " progress_stage, progress_fraction, cancel_requested, created_at)"
                    " VALUES (:id, 'default', :model, 'queued', :spec, :version, 0, 'queued', 0,"
                    " false, :now)"
                ),
                {
                    "id": job_id,
                    "model": model["id"],
                    "spec": json.dumps(spec.model_dump(mode="json")),
                    "version": SPEC_VERSION,
                    "now": utcnow(),
                },
            )
    finally:
        engine.dispose()
    job = service.wait_for_job(job_id, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["metrics"]["sparsity"] == pytest.approx(0.3, abs=0.005)
