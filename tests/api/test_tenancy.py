"""API keys and tenants, in process (the CLI's keys and a real job's artifacts stay in the e2e
tier): a key is required and checked, and another tenant's ids answer 404 on every route."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import Api, MakeApi, global_l1, upload
from tests.api.rows import finished_job
from tests.problems import assert_problem

KEY_A = "key-of-acme-0123456789"
KEY_B = "key-of-globex-9876543210"


@pytest.fixture(scope="module")
def secured(make_api: MakeApi) -> Api:
    return make_api(api_keys=f"acme:{KEY_A},globex:{KEY_B}")


def test_keys_are_required_and_checked(secured: Api) -> None:
    body = assert_problem(secured.client.get("/v1/models"), 401, "unauthorized")
    assert "Bearer" in body["detail"]
    assert secured.client.get("/v1/models").headers["www-authenticate"] == "Bearer"
    assert_problem(secured.as_tenant("not-a-key").get("/v1/jobs"), 401, "unauthorized")
    assert_problem(secured.client.post("/v1/jobs", json=global_l1("m")), 401, "unauthorized")
    # Health, metrics and docs stay open.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert secured.client.get(path).status_code == 200, path


def test_another_tenants_ids_answer_404_on_every_route(secured: Api, resnet_pt2: Path) -> None:
    acme, globex = secured.as_tenant(KEY_A), secured.as_tenant(KEY_B)
    model = upload(acme, resnet_pt2)
    job_id = finished_job(secured.sessions, secured.storage, "acme", model["id"])
    job = acme.get(f"/v1/jobs/{job_id}").json()
    (artifact,) = job["artifacts"]

    for method, path in [
        ("GET", f"/v1/models/{model['id']}"),
        ("DELETE", f"/v1/models/{model['id']}"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/layers"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("GET", artifact["download_url"]),
        ("GET", f"/v1/models/{job['result_model_id']}"),
    ]:
        assert_problem(globex.request(method, path), 404, "not-found")
    assert_problem(globex.post("/v1/jobs", json=global_l1(model["id"])), 404, "not-found")
    # A status poll's ETag says nothing across tenants: never a 304 for someone else's job.
    etag = acme.get(f"/v1/jobs/{job_id}").headers["etag"]
    for header in (etag, "*"):
        polled = globex.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": header})
        assert_problem(polled, 404, "not-found")
        anonymous = secured.client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": header})
        assert_problem(anonymous, 401, "unauthorized")
    assert acme.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag}).status_code == 304
    assert globex.get("/v1/models").json()["items"] == []
    assert globex.get("/v1/jobs").json()["items"] == []
    # ...and acme still has everything.
    assert acme.get(artifact["download_url"]).status_code == 200
    assert acme.get(f"/v1/models/{model['id']}").status_code == 200
    assert acme.get(f"/v1/jobs/{job_id}/layers").status_code == 200
