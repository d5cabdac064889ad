"""The status poll, ``GET /v1/jobs/{id}``: its body, its ETag and ``If-None-Match`` (304), on the
in-process app (moved from the e2e tier: without a worker a job changes only when the test
changes it)."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import Api, global_l1, upload
from tests.problems import assert_problem


def test_status_body_is_the_contracts_job(api: Api, resnet_pt2: Path) -> None:
    model = upload(api.client, resnet_pt2)
    created = api.client.post("/v1/jobs", json=global_l1(model["id"]))
    polled = api.client.get(f"/v1/jobs/{created.json()['id']}")
    assert polled.status_code == 200
    assert polled.headers["content-type"] == "application/json"
    # The same object, field for field, as the routes serialised through response_model.
    assert polled.json() == created.json()
    listed = api.client.get("/v1/jobs", params={"model_id": model["id"]}).json()["items"]
    assert listed == [polled.json()]
    assert polled.json()["metrics"]["sparsity"] is None  # every metric present, null until measured
    assert api.client.post(f"/v1/jobs/{created.json()['id']}/cancel").status_code == 202


def test_if_none_match_answers_304_until_the_job_changes(api: Api, resnet_pt2: Path) -> None:
    model = upload(api.client, resnet_pt2)
    job_id = api.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"]
    url = f"/v1/jobs/{job_id}"

    first = api.client.get(url)
    etag = first.headers["etag"]
    assert etag[0] == etag[-1] == '"'  # a strong tag
    assert "no-cache" in first.headers["cache-control"]
    assert api.client.get(url).headers["etag"] == etag  # unchanged job, same tag
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        not_modified = api.client.get(url, headers={"If-None-Match": header})
        assert not_modified.status_code == 304, header
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag
    assert api.client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    # Any change (here: cancelled) gives a new tag; the old one gets the new body.
    assert api.client.post(f"{url}/cancel").status_code == 202
    changed = api.client.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag
    again = api.client.get(url, headers={"If-None-Match": changed.headers["etag"]})
    assert again.status_code == 304

    # A deleted job is gone, whatever tag the client holds.
    assert api.client.delete(url).status_code == 204
    assert_problem(api.client.get(url, headers={"If-None-Match": "*"}), 404, "not-found")
