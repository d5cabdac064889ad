"""Faults with real processes: a broker restart that loses every message, a database outage, a
worker killed mid-job. Each test runs its own PostgreSQL/Redis on free ports and stops those."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bodies import global_l1
from tests.conftest import free_port
from tests.e2e.service import Service, service_env
from tests.e2e.test_walkthrough import upload
from tests.faults import PrivatePostgres, PrivateRedis, private_postgres, private_redis
from tests.problems import assert_problem

pytestmark = pytest.mark.e2e
__all__ = ["private_postgres", "private_redis"]  # fixtures used below


def make_service(tmp_path: Path, database: str, broker: str, with_worker: bool, **extra: str):
    port = free_port()
    env = service_env(
        tmp_path,
        port,
        database,
        broker,
        SHEARS_REQUEUE_AFTER_SECONDS="2",
        SHEARS_JOB_LEASE_SECONDS="3",
        **extra,
    )
    svc = Service(data_dir=tmp_path, env=env, port=port, with_worker=with_worker)
    svc.start()
    return svc


@pytest.fixture
def running() -> Iterator[list[Service]]:
    services: list[Service] = []
    yield services
    for svc in services:
        svc.stop()


def test_redis_restart_with_jobs_queued_loses_no_job(
    tmp_path: Path, private_redis: PrivateRedis, make_pg_database, running, resnet_pt2: Path
) -> None:
    svc = make_service(tmp_path, make_pg_database(), private_redis.url, with_worker=False)
    running.append(svc)
    model = upload(svc, resnet_pt2)
    queued = [
        svc.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"] for _ in range(3)
    ]

    private_redis.stop()  # no persistence: the three messages are gone
    assert svc.client.get("/readyz").status_code == 503
    # While the broker is down jobs are still accepted: the row is the truth.
    during = svc.client.post("/v1/jobs", json=global_l1(model["id"], 0.5))
    assert during.status_code == 202, during.text
    private_redis.start()

    svc.start_worker()
    svc.wait_ready()
    for job_id in [*queued, during.json()["id"]]:
        job = svc.wait_for_job(job_id, timeout=120)
        assert job["status"] == "succeeded", (job["error"], svc.logs("sweeper"))


def test_database_outage_gives_503_and_recovers_without_restart(
    tmp_path: Path, private_postgres: PrivatePostgres, redis_server, running, resnet_pt2: Path
) -> None:
    svc = make_service(tmp_path, private_postgres.url, redis_server, with_worker=True)
    running.append(svc)
    model = upload(svc, resnet_pt2)
    # Polled before the outage: the status poll's pool (no pre-ping) now holds a connection that
    # the restart will kill.
    done = svc.wait_for_job(svc.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"])

    private_postgres.stop()
    body = assert_problem(svc.client.get("/v1/jobs"), 503, "database-unavailable")
    assert "retry" in body["detail"]
    assert svc.client.get("/readyz").status_code == 503
    assert svc.client.get("/healthz").status_code == 200
    assert_problem(
        svc.client.post("/v1/jobs", json=global_l1(model["id"])), 503, "database-unavailable"
    )

    private_postgres.start()
    deadline = time.monotonic() + 30
    while svc.client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, svc.logs("api")
        time.sleep(0.5)
    # The first poll after the restart finds its pooled connection dead, and retries: no 503.
    polled = svc.client.get(f"/v1/jobs/{done['id']}")
    assert polled.status_code == 200, polled.text
    job = svc.wait_for_job(svc.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"])
    assert job["status"] == "succeeded", (job["error"], svc.logs("worker"))
    for name, proc in svc.procs.items():
        assert proc.poll() is None, f"{name} died during the outage"
