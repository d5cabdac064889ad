"""API keys and tenants with a real job's artifacts, keys made by the CLI, and the storage quota
that fails a running job, on the real processes. Key checks, Idempotency-Key, queued-job limits
and /metrics need no worker: tests/api."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.bodies import global_l1
from tests.e2e.conftest import BACKENDS, start_service
from tests.e2e.service import ROOT, Service
from tests.problems import assert_problem

pytestmark = pytest.mark.e2e

KEY_A = "key-of-acme-0123456789"
KEY_B = "key-of-globex-9876543210"


@pytest.fixture(scope="module", params=BACKENDS)
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    svc = start_service(
        request, tmp_path_factory, request.param, SHEARS_API_KEYS=f"acme:{KEY_A},globex:{KEY_B}"
    )
    try:
        yield svc
    finally:
        svc.stop()


def upload(client: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:
        response = client.post("/v1/models", files={"file": (path.name, f)})
    assert response.status_code == 201, response.text
    return response.json()


def test_another_tenants_ids_answer_404_on_every_route(secured: Service, resnet_pt2: Path) -> None:
    acme, globex = secured.as_tenant(KEY_A), secured.as_tenant(KEY_B)
    model = upload(acme, resnet_pt2)
    job = secured.wait_for_job(
        acme.post("/v1/jobs", json=global_l1(model["id"])).json()["id"], client=acme
    )
    assert job["status"] == "succeeded", job["error"]
    artifact = job["artifacts"][0]

    assert acme.get(f"/v1/models/{model['id']}").status_code == 200
    for method, path in [
        ("GET", f"/v1/models/{model['id']}"),
        ("DELETE", f"/v1/models/{model['id']}"),
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/layers"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
        ("GET", artifact["download_url"]),
        ("GET", f"/v1/models/{job['result_model_id']}"),
    ]:
        assert_problem(globex.request(method, path), 404, "not-found")
    assert_problem(globex.post("/v1/jobs", json=global_l1(model["id"])), 404, "not-found")
    # A status poll's ETag says nothing across tenants: never a 304 for someone else's job.
    etag = acme.get(f"/v1/jobs/{job['id']}").headers["etag"]
    for header in (etag, "*"):
        polled = globex.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": header})
        assert_problem(polled, 404, "not-found")
        anonymous = secured.client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": header})
        assert_problem(anonymous, 401, "unauthorized")
    assert acme.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag}).status_code == 304
    assert globex.get("/v1/models").json()["items"] == []
    assert globex.get("/v1/jobs").json()["items"] == []
    # ...and acme still has everything.
    assert acme.get(artifact["download_url"]).status_code == 200


def test_keys_from_the_cli(secured: Service) -> None:
    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "shears.cli", "keys", *args],
            cwd=ROOT,
            env=secured.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    created = dict(line.split(":", 1) for line in cli("create", "--tenant", "initech").splitlines())
    key, key_id = created["key"].strip(), created["id"].strip()
    client = secured.as_tenant(key)
    assert client.get("/v1/models").status_code == 200
    listed = cli("list")
    assert key_id in listed
    assert key not in listed  # only a prefix is ever shown again
    cli("revoke", key_id)
    time.sleep(1.2)  # API processes remember key lookups for one second
    assert_problem(client.get("/v1/models"), 401, "unauthorized")


def test_storage_quota(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, resnet_pt2: Path
) -> None:
    size = resnet_pt2.stat().st_size
    # Room for three uploads, not four, and not three plus a job's artifacts (~2.4 model sizes).
    quota = int(size * 3.8)
    svc = start_service(
        request, tmp_path_factory, "embedded", SHEARS_STORAGE_QUOTA_BYTES=str(quota)
    )
    try:
        models = [upload(svc.client, resnet_pt2) for _ in range(3)]
        body = assert_problem(
            svc.client.post("/v1/models", files={"file": ("m.pt2", resnet_pt2.read_bytes())}),
            413,
            "storage-quota-exceeded",
        )
        assert "quota" in body["detail"]

        failed = svc.wait_for_job(
            svc.client.post("/v1/jobs", json=global_l1(models[0]["id"])).json()["id"]
        )
        assert failed["status"] == "failed"
        assert failed["error"]["type"] == "storage_error"
        assert "quota" in failed["error"]["message"]
        assert failed["artifacts"] == []
        leftovers = [
            p for p in svc.storage_dir.rglob("*") if p.is_file() and failed["id"] in str(p)
        ]
        assert leftovers == []  # nothing truncated or half-written stays behind

        for model in models[1:]:
            assert svc.client.delete(f"/v1/models/{model['id']}").status_code == 204
        ok = svc.wait_for_job(
            svc.client.post("/v1/jobs", json=global_l1(models[0]["id"])).json()["id"]
        )
        assert ok["status"] == "succeeded", ok["error"]
    finally:
        svc.stop()
