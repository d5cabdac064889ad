"""Ratios found automatically, through the real processes: a target's sensitivity scan spread over
two Celery workers, its cells stored (a killed worker loses only the cell it was scoring), the
job body's ``search``, the ``sensitivity`` artifact and the plots."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from shears.cli import worker_command
from tests.conftest import free_port
from tests.e2e.conftest import BACKENDS
from tests.e2e.service import Service, service_env
from tests.e2e.test_walkthrough import submit, upload
from tests.factories import Digits, make_digits
from tests.problems import assert_problem

pytestmark = pytest.mark.e2e

GRID = [round(0.05 * i, 2) for i in range(1, 19)]  # 18 ratios: a scan long enough to share


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return make_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module", params=BACKENDS)
def two_workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The service with two worker processes, embedded (SQLite, a broker without a server) and
    on PostgreSQL with Redis."""
    data_dir = tmp_path_factory.mktemp("svc-search")
    port = free_port()
    database = broker = None
    if request.param != "embedded":
        database = request.getfixturevalue("make_pg_database")()
        broker = request.getfixturevalue("redis_server")
    env = service_env(data_dir, port, database, broker, SHEARS_JOB_LEASE_SECONDS="4")
    svc = Service(data_dir=data_dir, env=env, port=port, with_worker=False)
    try:
        svc.start()
        for name in ("worker-a", "worker-b"):
            svc._spawn(name, worker_command(env["SHEARS_QUEUE"]))
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def uploaded(two_workers: Service, digits: Digits) -> dict[str, str]:
    return {
        "model": upload(two_workers, digits.model_path)["id"],
        "train": upload(two_workers, digits.train, collection="datasets")["id"],
        "test": upload(two_workers, digits.test, collection="datasets")["id"],
    }


def target_job(ids: dict[str, str], **extra: object) -> dict:
    return {
        "model_id": ids["model"],
        "pruning": {
            "criterion": "l1",
            "granularity": "channel",
            "target": {"macs": 0.5},
            "search": {"dataset_id": ids["train"], "grid": GRID, "num_samples": 384},
        },
        "evaluation": {"dataset_id": ids["test"]},
        **extra,
    }


def cells(svc: Service, job_id: str) -> list[dict]:
    engine = create_engine(svc.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT unit, ratio, status, worker, attempts FROM scan_cells WHERE job_id = :j"
                ),
                {"j": job_id},
            )
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def events(svc: Service, job_id: str) -> list[dict]:
    return svc.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]


def test_a_macs_target_is_scanned_on_both_workers_and_met(two_workers: Service, uploaded) -> None:
    job = submit(two_workers, target_job(uploaded))
    done = two_workers.wait_for_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    search = done["search"]
    assert search["status"] == "done"
    assert search["layers_scanned"] == search["layers_total"] == 3  # c1, c2, c3's groups
    assert set(search["chosen"]) <= {"c1", "c2", "c3"}
    achieved = search["achieved"]
    measured = done["metrics"]["macs_after"] / done["metrics"]["macs_before"]
    assert achieved["macs"] == pytest.approx(measured)
    assert 0.48 <= measured <= 0.5
    assert achieved["met"] is True
    # The search predicts MACs exactly (slicing is linear in the channels removed).
    assert search["predicted"]["macs"] == pytest.approx(measured, abs=1e-6)
    assert achieved["accuracy"] == done["metrics"]["eval_after_pruning"]["accuracy"]

    rows = cells(two_workers, job["id"])
    assert len(rows) == 3 * len(GRID)
    assert all(row["status"] == "done" for row in rows)
    assert len({row["worker"] for row in rows}) == 2, "the scan ran on one worker only"
    scanned = [e for e in events(two_workers, job["id"]) if e["message"].startswith("scanned ")]
    assert len(scanned) == 3
    assert {w for e in scanned for w in e["data"]["workers"]} == {row["worker"] for row in rows}

    kinds = {a["kind"]: a for a in done["artifacts"]}
    assert {"model", "report", "sensitivity"} <= set(kinds)
    curves = two_workers.client.get(kinds["sensitivity"]["download_url"]).json()
    assert [u["unit"] for u in curves["units"]] == ["c1", "c2", "c3"]
    assert all(len(u["curve"]) == len(GRID) for u in curves["units"])
    assert curves["chosen"] == search["chosen"]

    for name in ("sensitivity", "layer_sparsity", "accuracy"):
        png = two_workers.client.get(f"/v1/jobs/{job['id']}/plots/{name}.png")
        assert png.status_code == 200, png.text
        assert png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
        svg = two_workers.client.get(f"/v1/jobs/{job['id']}/plots/{name}.svg")
        assert svg.headers["content-type"].startswith("image/svg+xml")
        root = ET.parse(io.BytesIO(svg.content)).getroot()  # noqa: S314 (our own server's output)
        assert root.tag.endswith("svg")
    assert_problem(two_workers.client.get(f"/v1/jobs/{job['id']}/plots/loss.png"), 404, "not-found")


def test_sensitivity_only_stops_after_the_scan(two_workers: Service, uploaded) -> None:
    job = submit(two_workers, target_job(uploaded, sensitivity_only=True))
    done = two_workers.wait_for_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert [a["kind"] for a in done["artifacts"]] == ["sensitivity"]
    assert done["result_model_id"] is None
    assert done["search"]["status"] == "scanned"
    assert done["search"]["layers_scanned"] == 3
    assert two_workers.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"] == []
    sensitivity = two_workers.client.get(f"/v1/jobs/{job['id']}/plots/sensitivity.svg")
    assert sensitivity.status_code == 200
    for name in ("layer_sparsity", "accuracy"):  # nothing was pruned, nothing evaluated
        assert_problem(
            two_workers.client.get(f"/v1/jobs/{job['id']}/plots/{name}.png"), 404, "not-found"
        )


def test_max_accuracy_drop_is_verified_after_fine_tuning(two_workers: Service, uploaded) -> None:
    body = target_job(uploaded)
    body["pruning"]["target"] = {"max_accuracy_drop": 0.01}
    body["pruning"]["search"]["grid"] = [0.2, 0.4, 0.6, 0.8]
    body["fine_tune"] = {"dataset_id": uploaded["train"], "epochs": 1, "lr": 0.002}
    done = two_workers.wait_for_job(submit(two_workers, body)["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    metrics, search = done["metrics"], done["search"]
    drop = metrics["eval_before"]["accuracy"] - metrics["eval_after_fine_tune"]["accuracy"]
    assert (
        search["achieved"]["accuracy_after_fine_tune"]
        == metrics["eval_after_fine_tune"]["accuracy"]
    )
    assert search["achieved"]["met"] is (drop <= 0.01 + 1e-9)
    assert search["achieved"]["met"] or search["step_backs"] == 2
    assert metrics["macs_after"] < metrics["macs_before"]  # as much as fits was removed
    assert any(r > 0 for r in search["chosen"].values())


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_a_worker_killed_mid_scan_loses_only_its_running_cell(
    two_workers: Service, uploaded
) -> None:
    victim = "worker-b"
    proc = two_workers.procs[victim]
    job = submit(two_workers, target_job(uploaded))
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and not killed:
        pids = {proc.pid, *_children(proc.pid)}
        for row in cells(two_workers, job["id"]):
            worker = row["worker"] or ""
            # Kill while it scores a cell, after it has finished others.
            if row["status"] == "running" and any(f"shears-{p}@" in worker for p in pids):
                done_by_victim = [
                    r
                    for r in cells(two_workers, job["id"])
                    if r["status"] == "done" and r["worker"] == worker
                ]
                if done_by_victim:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
        time.sleep(0.05)
    assert killed, "worker-b never scored a cell"
    proc.wait(timeout=30)
    # The other worker (and the job's own task, or its retry) finishes the scan and the job.
    two_workers._spawn(victim, worker_command(two_workers.env["SHEARS_QUEUE"]))
    done = two_workers.wait_for_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    rows = cells(two_workers, job["id"])
    assert all(row["status"] == "done" for row in rows)
    rescored = [row for row in rows if row["attempts"] > 1]
    assert len(rescored) <= 1, rescored  # only the cell it was scoring when it died
