"""/docs, /redoc and /ui in Chromium with the network cut off (loopback only), against the real
API and worker processes: the pages render from the API's own assets, the dashboard follows a
job live, uploads files, shows names as text, and asks for a key when auth is on."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.bodies import global_l1
from tests.e2e.browser import OfflinePage, chromium_path, launch, offline_page
from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.factories import save_npz

pytestmark = pytest.mark.e2e

PLOTS = ("sensitivity", "layer_sparsity", "accuracy")
KEY = "acme-dashboard-key"
OTHER_KEY = "beta-dashboard-key"


@pytest.fixture(scope="module", autouse=True)
def _chromium() -> None:
    """Skip (or fail under CI=true) before starting any service."""
    chromium_path()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with launch() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service with auth on (two tenants) whose worker starts only when a test starts it: jobs
    wait as `queued` until then, so a page can be seen to change without a reload."""
    keys = f"acme:{KEY},beta:{OTHER_KEY}"
    svc = start_service(
        request, tmp_path_factory, "embedded", with_worker=False, SHEARS_API_KEYS=keys
    )
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def acme(service: Service) -> Iterator[httpx.Client]:
    with service.as_tenant(KEY) as client:
        yield client


@pytest.fixture
def offline(browser) -> Iterator[OfflinePage]:
    """A page whose user has entered acme's key."""
    with offline_page(browser, api_key=KEY) as page:
        yield page


def url(service: Service, path: str) -> str:
    return f"http://127.0.0.1:{service.port}{path}"


def pct(fraction: float) -> str:
    """As the page writes a fraction: JavaScript's toFixed(1), which rounds half up."""
    exact = Decimal(fraction * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{exact}%"


def upload_model(client: httpx.Client, path: Path, name: str | None = None) -> dict:
    with path.open("rb") as f:
        response = client.post(
            "/v1/models", files={"file": (path.name, f)}, data={"name": name} if name else {}
        )
    assert response.status_code == 201, response.text
    return response.json()


def test_swagger_ui_renders_the_operations_offline(service: Service, offline: OfflinePage) -> None:
    from playwright.sync_api import expect

    response = offline.page.goto(url(service, "/docs"))
    assert response is not None
    assert response.ok
    submit_job = offline.page.locator(".opblock-post .opblock-summary-path[data-path='/v1/jobs']")
    expect(submit_job).to_be_visible(timeout=30_000)
    submit_job.click()  # the operation opens, with its request body schema
    opened = offline.page.locator(".opblock-post.is-open .opblock-section-request-body")
    expect(opened).to_be_visible()
    bundle = url(service, "/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert offline.loaded.get(bundle) == 200
    offline.assert_offline()


def test_redoc_renders_offline(service: Service, offline: OfflinePage) -> None:
    from playwright.sync_api import expect

    spec = service.client.get("/openapi.json").json()
    summary = spec["paths"]["/v1/jobs"]["post"]["summary"]
    response = offline.page.goto(url(service, "/redoc"))
    assert response is not None
    assert response.ok
    # Each operation: a heading that ends with its summary, and its method and path.
    heading = offline.page.get_by_role("heading", name=re.compile(rf" {re.escape(summary)}$"))
    expect(heading).to_be_visible(timeout=30_000)
    expect(offline.page.get_by_role("button", name="post /v1/jobs", exact=True)).to_be_visible()
    assert offline.loaded.get(url(service, "/static/vendor/redoc/redoc.standalone.js")) == 200
    offline.assert_offline()


def test_dashboard_follows_a_job_live(
    service: Service, acme: httpx.Client, offline: OfflinePage, resnet_pt2: Path
) -> None:
    from playwright.sync_api import expect

    page = offline.page
    followed: list[str] = []  # the content types of the page's requests for a job's events
    page.on(
        "response",
        lambda r: (
            followed.append(r.headers.get("content-type", ""))
            if "/events" in r.url and r.request.headers.get("accept") == "text/event-stream"
            else None
        ),
    )
    page.goto(url(service, "/ui"))
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.evaluate("window.sameDocument = true")  # gone if the page reloads

    # Submitted through the API after the page loaded: the list shows it without a reload.
    model = upload_model(acme, resnet_pt2)
    job = acme.post("/v1/jobs", json=global_l1(model["id"])).json()
    row = page.locator(f"tr[data-job-id='{job['id']}']")
    expect(row.get_by_role("link", name=job["id"], exact=True)).to_be_visible()
    expect(row.locator(".status")).to_have_text("queued")

    row.get_by_role("link").click()
    expect(page.get_by_role("heading", name=job["id"], exact=True)).to_be_visible()
    expect(page.locator("#summary .status")).to_have_text("queued")

    service.start_worker()
    expect(page.locator("#summary .status")).to_have_text("succeeded", timeout=180_000)
    assert page.evaluate("window.sameDocument") is True

    done = acme.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    # The page asked for the event stream; where the service offers one it followed it (else it
    # polled, which the status reaching `succeeded` above already shows).
    assert followed
    headers = {"Accept": "text/event-stream"}
    with acme.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers) as stream:
        offers_stream = stream.headers["content-type"].startswith("text/event-stream")
    assert offers_stream == followed[0].startswith("text/event-stream")
    metrics = page.locator("#metrics")
    expect(metrics.locator("tr", has_text="sparsity")).to_contain_text(
        pct(done["metrics"]["sparsity"])
    )
    params = metrics.locator("tr", has=page.get_by_role("rowheader", name="params", exact=True))
    expect(params).to_contain_text(f"{done['metrics']['params_before']:,}")

    layers = acme.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    assert layers
    expect(page.locator("#layers tbody tr")).to_have_count(len(layers))
    for layer in layers:
        name = page.get_by_role("rowheader", name=layer["name"], exact=True)
        layer_row = page.locator("#layers tbody tr", has=name)
        for cell in (f"{layer['params']:,}", f"{layer['nonzero']:,}", pct(layer["sparsity"])):
            expect(layer_row).to_contain_text(cell)
        meter = layer_row.locator("meter").evaluate("m => m.value")
        assert meter == pytest.approx(layer["sparsity"])

    # A plot the API serves is shown; one it answers 404 for is left out.
    for plot in PLOTS:
        status = acme.get(f"/v1/jobs/{job['id']}/plots/{plot}.svg").status_code
        figure = page.locator(f"figure[data-plot='{plot}'] img")
        if status == 200:
            expect(figure).to_be_visible()
            assert figure.evaluate("img => img.naturalWidth") > 0
        else:
            assert status == 404
            expect(figure).to_have_count(0)

    # Artifacts download with the key: the report the browser saves is the API's.
    (report,) = [a for a in done["artifacts"] if a["kind"] == "report"]
    with page.expect_download() as saved:
        page.get_by_role("button", name="Download report").click()
    assert Path(saved.value.path()).read_bytes() == acme.get(report["download_url"]).content

    page.get_by_role("link", name="All jobs").click()
    expect(row.locator(".status")).to_have_text("succeeded")
    assert page.evaluate("window.sameDocument") is True
    offline.assert_offline()


def test_uploads_through_the_file_inputs(
    acme: httpx.Client, service: Service, offline: OfflinePage, resnet_pt2: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = offline.page
    page.goto(url(service, "/ui#/uploads"))
    models = page.locator("#models")
    models.get_by_label("File").set_input_files(resnet_pt2)
    models.get_by_label("Name (optional)").fill("from-the-browser")
    models.get_by_role("button", name="Upload").click()
    expect(models.locator(".ok")).to_contain_text("Uploaded")
    (uploaded,) = [
        m for m in acme.get("/v1/models").json()["items"] if m["name"] == "from-the-browser"
    ]
    assert uploaded["sha256"] == hashlib.sha256(resnet_pt2.read_bytes()).hexdigest()
    expect(models.locator(f"tr[data-id='{uploaded['id']}']")).to_contain_text("from-the-browser")

    rng = np.random.default_rng(0)
    data = save_npz(
        tmp_path / "tiny.npz",
        inputs=rng.standard_normal((12, 1, 8, 8)).astype(np.float32),
        targets=rng.integers(0, 10, 12),
    )
    datasets = page.locator("#datasets")
    datasets.get_by_label("File").set_input_files(data)
    datasets.get_by_role("button", name="Upload").click()
    expect(datasets.locator(".ok")).to_contain_text("Uploaded")
    (dataset,) = acme.get("/v1/datasets").json()["items"]
    assert dataset["num_samples"] == 12
    expect(datasets.locator(f"tr[data-id='{dataset['id']}']")).to_be_visible()

    # A file Shears refuses: the problem's detail is shown, nothing is added.
    bogus = tmp_path / "notes.pt2"
    bogus.write_text("not a model")
    before = len(acme.get("/v1/models").json()["items"])
    models.get_by_label("File").set_input_files(bogus)
    models.get_by_role("button", name="Upload").click()
    problem = acme.post("/v1/models", files={"file": ("notes.pt2", b"not a model")}).json()
    expect(models.get_by_role("alert")).to_contain_text(problem["detail"])
    assert len(acme.get("/v1/models").json()["items"]) == before
    offline.assert_offline()


def test_names_render_as_text(
    acme: httpx.Client, service: Service, offline: OfflinePage, resnet_pt2: Path
) -> None:
    from playwright.sync_api import expect

    name = '<img src=x onerror="window.injected = 1">'
    model = upload_model(acme, resnet_pt2, name=name)
    job = acme.post("/v1/jobs", json={**global_l1(model["id"]), "name": name})
    assert job.status_code == 202, job.text

    page = offline.page
    page.goto(url(service, "/ui#/uploads"))
    expect(page.locator(f"tr[data-id='{model['id']}'] td.name")).to_have_text(name)
    page.goto(url(service, "/ui#/jobs"))
    expect(page.locator(f"tr[data-job-id='{job.json()['id']}']")).to_contain_text(name)
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("window.injected") is None
    offline.assert_offline()


def test_asks_for_a_key_and_keeps_it_in_the_browser(
    service: Service, browser, resnet_pt2: Path
) -> None:
    from playwright.sync_api import expect

    with service.as_tenant(OTHER_KEY) as beta, resnet_pt2.open("rb") as f:
        response = beta.post("/v1/models", files={"file": ("r.pt2", f)}, data={"name": "ours"})
        assert response.status_code == 201, response.text
    with offline_page(browser) as offline:  # a browser that has never seen a key
        page = offline.page
        sent: list[str | None] = []
        page.on(
            "request",
            lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None,
        )
        page.goto(url(service, "/ui#/uploads"))
        dialog = page.get_by_role("dialog")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text("Send an API key")

        dialog.get_by_label("Key").fill("wrong")
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_contain_text("unknown or revoked")

        dialog.get_by_label("Key").fill(OTHER_KEY)
        dialog.get_by_label("Remember in this browser").check()
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_be_hidden()
        # beta's models only: acme's uploads stay with acme.
        expect(page.locator("#models td.name")).to_have_text(["ours"])
        assert f"Bearer {OTHER_KEY}" in sent
        assert page.evaluate("localStorage.getItem('shears.apiKey')") == OTHER_KEY

        page.reload()  # remembered: no prompt
        expect(page.locator("#models td.name")).to_have_text(["ours"])
        expect(dialog).to_be_hidden()

        page.get_by_role("button", name="API key").click()
        dialog.get_by_role("button", name="Forget key").click()
        assert page.evaluate("localStorage.getItem('shears.apiKey')") is None
        expect(dialog).to_be_visible()  # asked again: the service still needs one
        offline.assert_offline()
