"""The status poll, ``GET /v1/jobs/{id}``: its body, its ETag and ``If-None-Match`` (304), on the
real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import BACKENDS, start_service
from tests.e2e.service import Service
from tests.e2e.test_bad_input import assert_problem
from tests.e2e.test_walkthrough import global_l1, upload

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=BACKENDS)
def idle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    # Without a worker a job changes only when the test changes it.
    svc = start_service(request, tmp_path_factory, request.param, with_worker=False)
    try:
        yield svc
    finally:
        svc.stop()


def test_status_body_is_the_contracts_job(idle: Service, resnet_pt2: Path) -> None:
    model = upload(idle, resnet_pt2)
    created = idle.client.post("/v1/jobs", json=global_l1(model["id"]))
    polled = idle.client.get(f"/v1/jobs/{created.json()['id']}")
    assert polled.status_code == 200
    assert polled.headers["content-type"] == "application/json"
    # The same object, field for field, as the routes serialised through response_model.
    assert polled.json() == created.json()
    listed = idle.client.get("/v1/jobs", params={"model_id": model["id"]}).json()["items"]
    assert listed == [polled.json()]
    assert polled.json()["metrics"]["sparsity"] is None  # every metric present, null until measured
    assert idle.client.post(f"/v1/jobs/{created.json()['id']}/cancel").status_code == 202


def test_if_none_match_answers_304_until_the_job_changes(idle: Service, resnet_pt2: Path) -> None:
    model = upload(idle, resnet_pt2)
    job_id = idle.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"]
    url = f"/v1/jobs/{job_id}"

    first = idle.client.get(url)
    etag = first.headers["etag"]
    assert etag[0] == etag[-1] == '"'  # a strong tag
    assert "no-cache" in first.headers["cache-control"]
    assert idle.client.get(url).headers["etag"] == etag  # unchanged job, same tag
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        not_modified = idle.client.get(url, headers={"If-None-Match": header})
        assert not_modified.status_code == 304, header
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag
    assert idle.client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    # Any change (here: cancelled) gives a new tag; the old one gets the new body.
    assert idle.client.post(f"{url}/cancel").status_code == 202
    changed = idle.client.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag
    again = idle.client.get(url, headers={"If-None-Match": changed.headers["etag"]})
    assert again.status_code == 304

    # A deleted job is gone, whatever tag the client holds.
    assert idle.client.delete(url).status_code == 204
    assert_problem(idle.client.get(url, headers={"If-None-Match": "*"}), 404, "not-found")
