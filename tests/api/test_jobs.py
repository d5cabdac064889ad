"""Submitting, listing, cancelling and deleting jobs without a worker: idempotency, the queue
limit, publishing after the commit, cursors, and the 409s (moved here from the e2e tier)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from shears.db.tables import Job
from tests.api.conftest import Api, MakeApi, global_l1, upload
from tests.api.rows import finished_job
from tests.problems import assert_problem
from worker.celery_app import create_celery


@pytest.fixture(scope="module")
def model(api: Api, resnet_pt2: Path) -> dict:
    return upload(api.client, resnet_pt2)


def enqueued_at(api: Api, job_id: str):
    with api.sessions() as session:
        return session.scalar(select(Job.enqueued_at).where(Job.id == job_id))


def test_a_job_is_stored_then_published(api: Api, model: dict) -> None:
    created = api.client.post("/v1/jobs", json=global_l1(model["id"]))
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["attempts"], job["progress"]) == (
        "queued",
        0,
        {"stage": "queued", "fraction": 0.0},
    )
    assert job["spec"]["pruning"]["sparsity"] == 0.8
    assert job["spec_version"] == 1
    assert enqueued_at(api, job["id"]) is not None  # the broker took the message
    events = api.client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["stage"], e["message"]) for e in events["items"]] == [("queued", "job accepted")]
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_with_the_broker_down_the_job_is_accepted_for_the_sweeper(api: Api, model: dict) -> None:
    down = api.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})  # no one there
    celery, api.app.state.celery = api.app.state.celery, create_celery(down)
    try:
        created = api.client.post("/v1/jobs", json=global_l1(model["id"]))
    finally:
        api.app.state.celery = celery
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "queued"
    assert enqueued_at(api, created.json()["id"]) is None  # the sweeper publishes it later
    assert api.client.post(f"/v1/jobs/{created.json()['id']}/cancel").status_code == 202


def test_idempotency_key(api: Api, resnet_pt2: Path) -> None:
    model = upload(api.client, resnet_pt2)
    body = global_l1(model["id"])
    headers = {"Idempotency-Key": "retry-me-1"}
    first = api.client.post("/v1/jobs", json=body, headers=headers)
    again = api.client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = api.client.post("/v1/jobs", json=global_l1(model["id"], 0.5), headers=headers)
    problem = assert_problem(other, 422, "idempotency-key-reused")
    assert "different request body" in problem["detail"]
    jobs = api.client.get("/v1/jobs", params={"model_id": model["id"]}).json()["items"]
    assert [j["id"] for j in jobs] == [first.json()["id"]]
    # Keys are per tenant-and-key: another key makes another job.
    third = api.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me-2"})
    assert third.status_code == 202
    assert third.json()["id"] != first.json()["id"]


def test_queued_jobs_per_tenant_are_limited(make_api: MakeApi, resnet_pt2: Path) -> None:
    api = make_api(max_queued_jobs_per_tenant=2)
    model = upload(api.client, resnet_pt2)
    accepted = [api.client.post("/v1/jobs", json=global_l1(model["id"])) for _ in range(2)]
    assert [r.status_code for r in accepted] == [202, 202]
    refused = api.client.post("/v1/jobs", json=global_l1(model["id"]))
    assert_problem(refused, 429, "too-many-queued-jobs")
    assert int(refused.headers["retry-after"]) > 0
    assert len(api.client.get("/v1/jobs").json()["items"]) == 2
    # Cancelling a queued job makes room again.
    cancelled = api.client.post(f"/v1/jobs/{accepted[0].json()['id']}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["progress"]["stage"] == "done"
    assert api.client.post("/v1/jobs", json=global_l1(model["id"])).status_code == 202

    metrics = api.client.get("/metrics").text
    assert 'shears_jobs{status="queued"} 2.0' in metrics
    assert 'shears_jobs{status="cancelled"} 1.0' in metrics
    assert "shears_queue_depth 2.0" in metrics
    assert "shears_job_duration_seconds_bucket" in metrics
    api.client.get("/v1/jobs/job_unknown_id_for_metrics")
    metrics = api.client.get("/metrics").text
    assert 'route="/v1/jobs/{job_id}"' in metrics
    assert "job_unknown_id_for_metrics" not in metrics  # ids never become labels


def test_cancel_and_delete_follow_the_jobs_state(api: Api, model: dict) -> None:
    queued = api.client.post("/v1/jobs", json=global_l1(model["id"])).json()
    # An active job can be neither deleted nor can its model be.
    assert_problem(api.client.delete(f"/v1/jobs/{queued['id']}"), 409, "job-active")
    assert_problem(api.client.delete(f"/v1/models/{model['id']}"), 409, "model-in-use")
    assert api.client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 202
    assert_problem(api.client.post(f"/v1/jobs/{queued['id']}/cancel"), 409, "job-finished")
    events = api.client.get(f"/v1/jobs/{queued['id']}/events").json()["items"]
    assert events[-1]["data"] == {"status": "cancelled"}
    assert api.client.delete(f"/v1/jobs/{queued['id']}").status_code == 204
    assert_problem(api.client.get(f"/v1/jobs/{queued['id']}"), 404, "not-found")

    done = finished_job(api.sessions, api.storage, "default", model["id"])
    job = api.client.get(f"/v1/jobs/{done}").json()
    assert_problem(api.client.post(f"/v1/jobs/{done}/cancel"), 409, "job-finished")
    files = api.stored_files()
    (report,) = job["artifacts"]
    assert api.client.get(report["download_url"]).content == b'{"report": true}'
    assert api.client.delete(f"/v1/jobs/{done}").status_code == 204
    assert len(api.stored_files()) == len(files) - 1  # the artifact's file went with the job
    assert_problem(api.client.get(report["download_url"]), 404, "not-found")


def test_a_missing_artifact_file_is_410(api: Api, model: dict) -> None:
    done = finished_job(api.sessions, api.storage, "default", model["id"])
    (report,) = api.client.get(f"/v1/jobs/{done}").json()["artifacts"]
    for path in api.stored_files():
        if done in str(path):
            path.unlink()
    assert_problem(api.client.get(report["download_url"]), 410, "artifact-gone")


def test_lists_page_with_cursors(api: Api, resnet_pt2: Path) -> None:
    model = upload(api.client, resnet_pt2)
    ids = [api.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, "model_id": model["id"], **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]  # newest first, each once
    api.client.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = api.client.get(
        "/v1/jobs", params={"status": "cancelled", "model_id": model["id"]}
    ).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert api.client.get("/v1/jobs", params={"model_id": "mdl_other"}).json()["items"] == []
    assert_problem(api.client.get("/v1/jobs", params={"limit": 0}), 422, "validation-error")
    assert_problem(api.client.get("/v1/jobs", params={"status": "lost"}), 422, "validation-error")

    events = api.client.get(f"/v1/jobs/{ids[0]}/events", params={"limit": 1}).json()
    assert [e["stage"] for e in events["items"]] == ["queued"]
    rest = api.client.get(
        f"/v1/jobs/{ids[0]}/events", params={"cursor": events["next_cursor"]}
    ).json()
    assert [e["message"] for e in rest["items"]] == ["cancelled before it started"]
    assert rest["next_cursor"] is None
    assert_problem(
        api.client.get(f"/v1/jobs/{ids[0]}/events", params={"cursor": "x"}), 400, "invalid-cursor"
    )

    for id_ in ids:
        api.client.post(f"/v1/jobs/{id_}/cancel")
    first = api.client.get("/v1/models", params={"limit": 1}).json()
    assert [m["id"] for m in first["items"]] == [model["id"]]  # the newest
    second = api.client.get("/v1/models", params={"limit": 1, "cursor": first["next_cursor"]})
    assert second.json()["items"][0]["id"] != model["id"]
