"""A job's events as Server-Sent Events (``GET /v1/jobs/{id}/events``, ``Accept:
text/event-stream``) on a real job run by a real worker: every stored event once and in order,
progress between them, the end after the final event, ``Last-Event-ID`` resuming; the JSON form
as it was; refusals as problem details. And ``Client.wait`` on the stream, or polling where a
proxy will not pass the stream."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from shears import Client
from tests.bodies import global_l1
from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.factories import save_npz

pytestmark = pytest.mark.e2e


def stream(
    client: httpx.Client, job_id: str, last_event_id: str | None = None, stop_after: int = 0
) -> list[ServerSentEvent]:
    """The messages of one connection to the job's stream, read until the server ends it (or,
    with ``stop_after``, until that many stored events, then hang up)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    messages: list[ServerSentEvent] = []
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for message in source.iter_sse():
            if not message.data:  # a keep-alive comment (httpx-sse yields it once ids began)
                continue
            messages.append(message)
            if stop_after and len(stored(messages)) == stop_after:
                break
    return messages


def stored(messages: list[ServerSentEvent]) -> list[ServerSentEvent]:
    return [m for m in messages if m.event != "progress"]


def json_events(client: httpx.Client, job_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """Every event of the job through the JSON form, page by page."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/jobs/{job_id}/events", params=params)
        assert page.status_code == 200
        assert page.headers["content-type"] == "application/json"
        body = page.json()
        assert set(body) == {"items", "next_cursor"}
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def as_json_items(messages: list[ServerSentEvent]) -> list[dict[str, Any]]:
    """Stored events as the JSON form shows them (its items have no id)."""
    return [{k: v for k, v in m.json().items() if k != "id"} for m in stored(messages)]


@pytest.fixture
def fine_tune_job(service: Service, resnet_pt2: Path, tmp_path: Path) -> str:
    """A job that prunes, fine-tunes a few epochs and exports: several stages, and progress."""
    model = service.client.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
    rng = np.random.default_rng(0)
    data = save_npz(
        tmp_path / "train.npz",
        inputs=rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
        targets=rng.integers(0, 10, 16),
    )
    dataset = service.client.post("/v1/datasets", files={"file": data.read_bytes()}).json()
    body = global_l1(model["id"], 0.5)
    # 400 small steps: a second or more of fine-tuning, long enough to be seen in progress
    # (written every half second), and an event per epoch.
    body["fine_tune"] = {"dataset_id": dataset["id"], "epochs": 100, "batch_size": 4}
    job = service.client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def test_the_stream_follows_a_real_job_to_its_end_and_resumes(
    service: Service, fine_tune_job: str
) -> None:
    client = service.client
    # While one reader follows the job on one connection from its start to the end...
    interrupted: dict[str, list[ServerSentEvent]] = {}

    def hang_up_and_resume() -> None:
        # ...another hangs up after two events and comes back after the last one it saw.
        with httpx.Client(base_url=str(client.base_url), timeout=60) as other:
            interrupted["first"] = stream(other, fine_tune_job, stop_after=2)
            last = stored(interrupted["first"])[-1].id
            interrupted["rest"] = stream(other, fine_tune_job, last_event_id=last)

    second = threading.Thread(target=hang_up_and_resume)
    second.start()
    whole = stream(client, fine_tune_job)
    second.join(timeout=300)

    history = json_events(client, fine_tune_job)
    assert as_json_items(whole) == history  # every stored event once, in order, as JSON says
    resumed = stored(interrupted["first"]) + interrupted["rest"]
    assert as_json_items(resumed) == history  # nothing lost or repeated on resume
    ids = [int(m.id) for m in stored(whole)]
    assert ids == sorted(set(ids))
    for message in stored(whole):
        assert message.event == message.json()["stage"]  # event: the stage
        assert message.json()["id"] == int(message.id)  # id: the event's id

    job = client.get(f"/v1/jobs/{fine_tune_job}").json()
    assert job["status"] == "succeeded", job["error"]
    # The stream ends after the final event, which says how the job ended...
    assert whole[-1].event == "done"
    assert whole[-1].json()["data"]["status"] == "succeeded"
    # ...and carried the job's progress as it moved (fine-tuning writes it every half second,
    # as no event): each change once, forward only, ending where the job body ends.
    progress = [m.json() for m in whole if m.event == "progress"]
    assert progress[-1] == {"status": "succeeded", **job["progress"]}
    assert progress[0]["status"] in ("queued", "running")
    assert any(p["stage"] == "fine_tuning" and 0 < p["fraction"] < 1 for p in progress)
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions)
    assert len({(p["status"], p["stage"], p["fraction"]) for p in progress}) == len(progress)
    # A progress message carries the id of the last stored event before it: resuming from it
    # loses nothing.
    last_id = None
    for message in whole:
        if message.event == "progress":
            assert message.id == (last_id or "")
        else:
            last_id = message.id


def test_resuming_a_finished_job(service: Service, resnet_pt2: Path) -> None:
    client = service.client
    model = client.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
    job_id = client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"]
    job = service.wait_for_job(job_id)
    whole = stored(stream(client, job_id))
    middle = whole[len(whole) // 2]

    # After an event in the middle: the job's state now, then every later event.
    resumed = stream(client, job_id, last_event_id=middle.id)
    assert resumed[0].event == "progress"
    assert resumed[0].id == middle.id
    assert resumed[0].json() == {"status": job["status"], **job["progress"]}
    assert [m.id for m in resumed[1:]] == [m.id for m in whole if int(m.id) > int(middle.id)]
    # `cursor` does the same for a client that cannot set headers (a browser's first request).
    by_cursor = client.get(
        f"/v1/jobs/{job_id}/events",
        params={"cursor": middle.id},
        headers={"Accept": "text/event-stream"},
    )
    assert [line for line in by_cursor.text.splitlines() if line.startswith("id:")] == [
        f"id: {m.id}" for m in resumed
    ]
    # After the final event nothing will come: 204, which stops an EventSource reconnecting.
    after_end = client.get(
        f"/v1/jobs/{job_id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": whole[-1].id},
    )
    assert after_end.status_code == 204
    assert after_end.content == b""
    # An id this service never sent is a 400, as a bad cursor is.
    bad = client.get(
        f"/v1/jobs/{job_id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": "x7"},
    )
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["type"] == "/problems/invalid-cursor"


def test_the_json_form_is_unchanged(service: Service, resnet_pt2: Path) -> None:
    client = service.client
    model = client.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
    job_id = client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"]
    service.wait_for_job(job_id)
    items = json_events(client, job_id, limit=2)  # pages of 2, by cursor
    assert items[0]["stage"] == "queued"
    assert items[-1]["data"] == {"status": "succeeded"}
    assert all(set(item) == {"at", "stage", "message", "data"} for item in items)
    # No Accept, */*, JSON, or JSON preferred over the stream: the JSON form, all at once.
    for accept in (None, "*/*", "application/json", "text/event-stream;q=0.5, application/json"):
        headers = {"Accept": accept} if accept else {}
        answer = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert answer.headers["content-type"] == "application/json", accept
        assert answer.json() == {"items": items, "next_cursor": None}
    bad = client.get(f"/v1/jobs/{job_id}/events", params={"cursor": "²"})
    assert bad.status_code == 400
    assert bad.json()["type"] == "/problems/invalid-cursor"


@pytest.fixture(scope="module")
def keyed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service with API keys for tenants a and b, no worker (jobs stay queued), and a short
    keep-alive."""
    svc = start_service(
        request,
        tmp_path_factory,
        "embedded",
        with_worker=False,
        SHEARS_API_KEYS="a:key-a-0123456789,b:key-b-0123456789",
        SHEARS_EVENTS_KEEPALIVE_SECONDS="0.3",
    )
    try:
        yield svc
    finally:
        svc.stop()


def test_the_stream_is_scoped_and_refused_like_the_json_form(
    keyed: Service, resnet_pt2: Path
) -> None:
    sse = {"Accept": "text/event-stream"}
    with keyed.as_tenant("key-a-0123456789") as a, keyed.as_tenant("key-b-0123456789") as b:
        model = a.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
        job_id = a.post("/v1/jobs", json=global_l1(model["id"])).json()["id"]
        # Its tenant gets the stream; the job stays queued here (no worker), and the stream
        # stays open with a comment line every keep-alive interval.
        lines = []
        with a.stream("GET", f"/v1/jobs/{job_id}/events", headers=sse) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                lines.append(line)
                if sum(line.startswith(":") for line in lines) == 2:
                    break
        assert "event: queued" in lines
        assert "event: progress" in lines
        # Another tenant gets what an unknown id gets: 404, before any stream starts.
        for client, path in ((b, job_id), (a, "job_unknown")):
            refused = client.get(f"/v1/jobs/{path}/events", headers=sse)
            assert refused.status_code == 404
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["type"] == "/problems/not-found"
    # No key, or a wrong one: 401, as everywhere under /v1.
    for headers in (sse, {**sse, "Authorization": "Bearer nope"}):
        refused = keyed.client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["www-authenticate"] == "Bearer"


def recording(client: Client) -> list[tuple[str, str]]:
    """(path, Accept) of every request ``client`` sends from now on."""
    sent: list[tuple[str, str]] = []
    client.http.event_hooks["request"].append(
        lambda r: sent.append((r.url.path, r.headers.get("accept", "")))
    )
    return sent


def test_client_wait_follows_the_stream(service: Service, fine_tune_job: str) -> None:
    with Client(f"http://127.0.0.1:{service.port}") as client:
        sent = recording(client)
        job = client.wait(fine_tune_job)
        assert job == client.get_job(fine_tune_job)
    assert job["status"] == "succeeded"
    job_path, events_path = f"/v1/jobs/{fine_tune_job}", f"/v1/jobs/{fine_tune_job}/events"
    # One read of the job, the stream to its end, one read of the final body: no polling.
    assert sent[:3] == [
        (job_path, "*/*"),
        (events_path, "text/event-stream"),
        (job_path, "*/*"),
    ]


class _JsonOnlyProxy(http.server.BaseHTTPRequestHandler):
    """A reverse proxy that drops ``Accept`` (as some do), so the API answers the JSON form
    where the client asked for a stream."""

    upstream: str

    def do_GET(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("accept", "host")}
        answer = httpx.get(self.upstream + self.path, headers=headers, timeout=60)
        self.send_response(answer.status_code)
        for name in ("content-type", "etag"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("content-length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_client_wait_polls_where_the_stream_is_unavailable(
    service: Service, resnet_pt2: Path
) -> None:
    handler = type("Proxy", (_JsonOnlyProxy,), {"upstream": f"http://127.0.0.1:{service.port}"})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        model = service.client.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
        job_id = service.client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"]
        with Client(f"http://127.0.0.1:{proxy.server_address[1]}") as client:
            sent = recording(client)
            job = client.wait(job_id, poll_interval=0.2)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert job["status"] == "succeeded"
    assert job == service.client.get(f"/v1/jobs/{job_id}").json()
    paths = [path for path, _ in sent]
    # The stream was asked for once, answered with a page of JSON, and the job polled instead.
    assert paths.count(f"/v1/jobs/{job_id}/events") == 1
    assert paths.index(f"/v1/jobs/{job_id}/events") == 1
    assert paths.count(f"/v1/jobs/{job_id}") >= 2
