"""``/v1/webhooks`` in process: what is refused at creation (bad or private URLs, unknown events),
the secret shown once, tenancy, and the delivery log's shape. Sending is the e2e tier's."""

from __future__ import annotations

import pytest

from shears.db import webhooks_repo
from shears.db.tables import new_id
from tests.api.conftest import Api, MakeApi
from tests.problems import assert_problem

KEY_A = "key-of-acme-0123456789"
KEY_B = "key-of-globex-9876543210"
PUBLIC = "https://93.184.215.14/hooks/shears"  # a literal: checked, never contacted


@pytest.fixture(scope="module")
def secured(make_api: MakeApi) -> Api:
    return make_api(api_keys=f"acme:{KEY_A},globex:{KEY_B}")


def test_create_shows_the_secret_once(api: Api) -> None:
    created = api.client.post(
        "/v1/webhooks",
        json={"url": PUBLIC, "events": ["job.succeeded", "job.failed"], "description": "ci"},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("whk_")
    assert body["secret"].startswith("whsec_")
    assert body["events"] == ["job.succeeded", "job.failed"]
    assert (body["url"], body["description"]) == (PUBLIC, "ci")
    got = api.client.get(f"/v1/webhooks/{body['id']}").json()
    assert "secret" not in got
    assert got == {k: v for k, v in body.items() if k != "secret"}
    listed = api.client.get("/v1/webhooks").json()
    assert body["id"] in [item["id"] for item in listed["items"]]
    assert all("secret" not in item for item in listed["items"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.0.0.8/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:192.168.0.1]/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_private_targets_are_refused(api: Api, url: str) -> None:
    response = api.client.post("/v1/webhooks", json={"url": url, "events": ["job.failed"]})
    body = assert_problem(response, 422, "validation-error")
    assert "not a public address" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "url"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://93.184.215.14/x", "only http and https"),
        ("not a url", "only http and https"),
        ("https://user:secret@93.184.215.14/", "credentials"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_bad_urls_are_refused(api: Api, url: str, why: str) -> None:
    response = api.client.post("/v1/webhooks", json={"url": url, "events": ["job.failed"]})
    assert why in assert_problem(response, 422, "validation-error")["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"url": PUBLIC, "events": ["job.exploded"]},
        {"url": PUBLIC, "events": []},
        {"url": PUBLIC},
        {"url": PUBLIC, "events": ["job.failed"], "secret": "whsec_mine"},
        {"url": "", "events": ["job.failed"]},
    ],
)
def test_malformed_bodies_are_refused(api: Api, body: dict) -> None:
    assert_problem(api.client.post("/v1/webhooks", json=body), 422, "validation-error")


def test_private_targets_are_allowed_when_configured(make_api: MakeApi) -> None:
    dev = make_api(webhook_allow_private=True)
    response = dev.client.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["job.started"]}
    )
    assert response.status_code == 201, response.text


def test_duplicate_events_are_kept_once(api: Api) -> None:
    body = {"url": PUBLIC, "events": ["job.failed", "job.failed", "job.cancelled"]}
    created = api.client.post("/v1/webhooks", json=body).json()
    assert created["events"] == ["job.failed", "job.cancelled"]


def test_another_tenants_webhooks_answer_404(secured: Api) -> None:
    acme, globex = secured.as_tenant(KEY_A), secured.as_tenant(KEY_B)
    hook = acme.post("/v1/webhooks", json={"url": PUBLIC, "events": ["job.failed"]}).json()
    for method, path in [
        ("GET", f"/v1/webhooks/{hook['id']}"),
        ("DELETE", f"/v1/webhooks/{hook['id']}"),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
    ]:
        assert_problem(globex.request(method, path), 404, "not-found")
    assert hook["id"] not in [h["id"] for h in globex.get("/v1/webhooks").json()["items"]]
    assert acme.get(f"/v1/webhooks/{hook['id']}").status_code == 200
    assert_problem(secured.client.get("/v1/webhooks"), 401, "unauthorized")


def test_the_delivery_log_and_delete(api: Api) -> None:
    hook = api.client.post("/v1/webhooks", json={"url": PUBLIC, "events": ["job.failed"]}).json()
    other = api.client.post("/v1/webhooks", json={"url": PUBLIC, "events": ["job.started"]})
    with api.sessions.begin() as session:
        created = webhooks_repo.add_deliveries(
            session, "default", "job.failed", new_id("msg"), "job_x", '{"type":"job.failed"}'
        )
    assert len(created) >= 1
    page = api.client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()
    (item,) = page["items"]
    assert page["next_cursor"] is None
    assert {k: item[k] for k in ("event", "status", "attempts", "last_status_code", "job_id")} == {
        "event": "job.failed",
        "status": "pending",
        "attempts": 0,
        "last_status_code": None,
        "job_id": "job_x",
    }
    assert item["next_attempt_at"] is not None
    assert item["message_id"].startswith("msg_")
    # Subscribed to another event: nothing logged.
    assert api.client.get(f"/v1/webhooks/{other.json()['id']}/deliveries").json()["items"] == []

    assert api.client.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
    assert_problem(api.client.get(f"/v1/webhooks/{hook['id']}"), 404, "not-found")
    assert_problem(api.client.get(f"/v1/webhooks/{hook['id']}/deliveries"), 404, "not-found")
