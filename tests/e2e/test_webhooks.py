"""Webhooks on the real processes: a receiver on loopback that fails twice and then accepts gets
three signed attempts of one message; the delivery log says so; an endpoint that never accepts
ends ``failed``; endpoints get only the events they subscribed to; and deliveries leave from the
notify worker, with no pruning worker running at all."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bodies import global_l1
from tests.e2e.conftest import BACKENDS, start_service
from tests.e2e.service import Service
from tests.webhook_receiver import Receiver, fail_then_accept, receiver

pytestmark = pytest.mark.e2e

# Short retries for the test: one attempt, then three retries about half a second apart.
SCHEDULE = "0.5,0.5,0.5"


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


@pytest.fixture(scope="module", params=BACKENDS)
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    # No pruning worker: what is delivered here, the notify worker delivers alone.
    svc = start_service(
        request,
        tmp_path_factory,
        request.param,
        with_worker=False,
        SHEARS_WEBHOOK_ALLOW_PRIVATE="true",
        SHEARS_WEBHOOK_RETRY_SCHEDULE=SCHEDULE,
    )
    try:
        yield svc
    finally:
        svc.stop()


def subscribe(svc: Service, hooks: Receiver, path: str, events: list[str]) -> dict[str, Any]:
    path = f"/{svc.port}{path}"  # each backend's service has paths of its own
    response = svc.client.post("/v1/webhooks", json={"url": hooks.url(path), "events": events})
    assert response.status_code == 201, response.text
    hook = response.json()
    hooks.secrets[path] = hook["secret"]
    return {**hook, "path": path}


def delivered(svc: Service, hook: dict[str, Any], status: str, timeout: float = 60) -> list[dict]:
    """The endpoint's delivery log once every delivery in it has ``status``."""
    deadline = time.monotonic() + timeout
    items: list[dict] = []
    while time.monotonic() < deadline:
        items = svc.client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
        if items and all(item["status"] == status for item in items):
            return items
        time.sleep(0.2)
    raise AssertionError(f"deliveries of {hook['path']}: {items}\n{svc.logs('notify')}")


def upload(client: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:
        response = client.post("/v1/models", files={"file": (path.name, f)})
    assert response.status_code == 201, response.text
    return response.json()


def test_retries_signatures_log_and_event_filter(
    service: Service, hooks: Receiver, resnet_pt2: Path
) -> None:
    flaky = subscribe(service, hooks, "/flaky", ["job.cancelled"])
    dead = subscribe(service, hooks, "/dead", ["job.cancelled", "job.failed"])
    finished = subscribe(service, hooks, "/finished", ["job.started", "job.succeeded"])
    hooks.scripts[flaky["path"]] = fail_then_accept(2)
    hooks.scripts[dead["path"]] = lambda _: (500, b"down for good")

    model = upload(service.client, resnet_pt2)
    job = service.client.post("/v1/jobs", json=global_l1(model["id"])).json()
    cancelled = service.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"

    # Two 500s, then accepted: three attempts of one message, each signed with the secret.
    attempts = hooks.wait_for(flaky["path"], 3)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    for attempt in attempts:
        assert isinstance(attempt.verified, dict), attempt.verified
        assert attempt.body == attempts[0].body
    event = attempts[0].verified
    assert event["type"] == "job.cancelled"
    assert event["data"] == service.client.get(f"/v1/jobs/{job['id']}").json()
    (logged,) = delivered(service, flaky, "succeeded")
    assert logged["attempts"] == 3
    assert logged["last_status_code"] == 204
    assert logged["next_attempt_at"] is None
    assert logged["message_id"] == attempts[0].headers["webhook-id"]
    assert logged["job_id"] == job["id"]

    # Never accepted: one attempt plus one per retry in the schedule, then it gives up.
    (given_up,) = delivered(service, dead, "failed")
    assert given_up["attempts"] == 1 + len(SCHEDULE.split(","))
    assert given_up["last_status_code"] == 500
    assert "down for good" in given_up["last_error"]
    assert len(hooks.at(dead["path"])) == given_up["attempts"]

    # Not subscribed to cancellations: nothing sent, nothing logged.
    assert hooks.at(finished["path"]) == []
    assert service.client.get(f"/v1/webhooks/{finished['id']}/deliveries").json()["items"] == []


def test_a_job_run_by_the_worker_announces_its_start_and_success(
    service: Service, hooks: Receiver, resnet_pt2: Path
) -> None:
    finished = subscribe(service, hooks, "/ran", ["job.started", "job.succeeded"])
    cancelled = subscribe(service, hooks, "/cancels", ["job.cancelled"])
    service.start_worker()
    model = upload(service.client, resnet_pt2)
    job = service.client.post("/v1/jobs", json=global_l1(model["id"])).json()
    done = service.wait_for_job(job["id"])
    assert done["status"] == "succeeded", done["error"]

    started, succeeded = (a.verified for a in hooks.wait_for(finished["path"], 2))
    assert (started["type"], succeeded["type"]) == ("job.started", "job.succeeded")
    assert started["data"]["id"] == job["id"]
    assert started["data"]["status"] == "running"
    # The job as GET shows it, artifacts and metrics included.
    assert succeeded["data"] == service.client.get(f"/v1/jobs/{job['id']}").json()
    assert succeeded["data"]["artifacts"]
    logged = delivered(service, finished, "succeeded")
    assert sorted(item["event"] for item in logged) == ["job.started", "job.succeeded"]
    assert all(item["attempts"] == 1 for item in logged)
    assert hooks.at(cancelled["path"]) == []
