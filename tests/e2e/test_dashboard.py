"""/docs, /redoc and /ui in Chromium with the network cut off (loopback only), against the real
API and worker processes: the pages render from the API's own assets, the dashboard follows a
job live, uploads files, shows names as text, and asks for a key when auth is on."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest

from tests.bodies import global_l1
from tests.e2e.browser import OfflinePage, launch, offline_page
from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.factories import save_npz

pytestmark = pytest.mark.e2e

PLOTS = ("sensitivity", "layer_sparsity", "accuracy")
KEY = "acme-dashboard-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with launch() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def idle_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service whose worker starts only when a test starts it: jobs wait as `queued` until
    then, so a page can be seen to change without a reload."""
    svc = start_service(request, tmp_path_factory, "embedded", with_worker=False)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def offline(browser) -> Iterator[OfflinePage]:
    with offline_page(browser) as page:
        yield page


def url(service: Service, path: str) -> str:
    return f"http://127.0.0.1:{service.port}{path}"


def pct(fraction: float) -> str:
    """As the page writes a fraction: JavaScript's toFixed(1), which rounds half up."""
    exact = Decimal(fraction * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{exact}%"


def upload_model(service: Service, path: Path, name: str | None = None) -> dict:
    with path.open("rb") as f:
        response = service.client.post(
            "/v1/models", files={"file": (path.name, f)}, data={"name": name} if name else {}
        )
    assert response.status_code == 201, response.text
    return response.json()


def test_swagger_ui_renders_the_operations_offline(
    idle_service: Service, offline: OfflinePage
) -> None:
    from playwright.sync_api import expect

    response = offline.page.goto(url(idle_service, "/docs"))
    assert response is not None
    assert response.ok
    submit_job = offline.page.locator(".opblock-post .opblock-summary-path[data-path='/v1/jobs']")
    expect(submit_job).to_be_visible(timeout=30_000)
    submit_job.click()  # the operation opens, with its request body schema
    expect(
        offline.page.locator(".opblock-post.is-open .opblock-section-request-body")
    ).to_be_visible()
    bundle = url(idle_service, "/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert offline.loaded.get(bundle) == 200
    offline.assert_offline()


def test_redoc_renders_offline(idle_service: Service, offline: OfflinePage) -> None:
    from playwright.sync_api import expect

    spec = idle_service.client.get("/openapi.json").json()
    summary = spec["paths"]["/v1/jobs"]["post"]["summary"]
    response = offline.page.goto(url(idle_service, "/redoc"))
    assert response is not None
    assert response.ok
    # Each operation: a heading that ends with its summary, and its method and path.
    heading = offline.page.get_by_role("heading", name=re.compile(rf" {re.escape(summary)}$"))
    expect(heading).to_be_visible(timeout=30_000)
    expect(offline.page.get_by_role("button", name="post /v1/jobs", exact=True)).to_be_visible()
    assert offline.loaded.get(url(idle_service, "/static/vendor/redoc/redoc.standalone.js")) == 200
    offline.assert_offline()


def test_dashboard_follows_a_job_live(
    idle_service: Service, offline: OfflinePage, resnet_pt2: Path
) -> None:
    from playwright.sync_api import expect

    page = offline.page
    page.goto(url(idle_service, "/ui"))
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.evaluate("window.sameDocument = true")  # gone if the page reloads

    # Submitted through the API after the page loaded: the list shows it without a reload.
    model = upload_model(idle_service, resnet_pt2)
    job = idle_service.client.post("/v1/jobs", json=global_l1(model["id"])).json()
    row = page.locator(f"tr[data-job-id='{job['id']}']")
    expect(row.get_by_role("link", name=job["id"], exact=True)).to_be_visible()
    expect(row.locator(".status")).to_have_text("queued")

    row.get_by_role("link").click()
    expect(page.get_by_role("heading", name=job["id"], exact=True)).to_be_visible()
    expect(page.locator("#summary .status")).to_have_text("queued")

    idle_service.start_worker()
    expect(page.locator("#summary .status")).to_have_text("succeeded", timeout=180_000)
    assert page.evaluate("window.sameDocument") is True

    done = idle_service.client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    metrics = page.locator("#metrics")
    expect(metrics.locator("tr", has_text="sparsity")).to_contain_text(
        pct(done["metrics"]["sparsity"])
    )
    params = metrics.locator("tr", has=page.locator("th", has_text="params"))
    expect(params.first).to_contain_text(f"{done['metrics']['params_before']:,}")

    layers = idle_service.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    assert layers
    expect(page.locator("#layers tbody tr")).to_have_count(len(layers))
    for layer in layers:
        layer_row = page.locator(
            "#layers tbody tr", has=page.get_by_role("rowheader", name=layer["name"], exact=True)
        )
        for cell in (f"{layer['params']:,}", f"{layer['nonzero']:,}", pct(layer["sparsity"])):
            expect(layer_row).to_contain_text(cell)
        assert layer_row.locator("meter").evaluate("m => m.value") == pytest.approx(
            layer["sparsity"]
        )

    # A plot the API serves is shown; one it answers 404 for is left out.
    for name in PLOTS:
        status = idle_service.client.get(f"/v1/jobs/{job['id']}/plots/{name}.svg").status_code
        figure = page.locator(f"figure[data-plot='{name}'] img")
        if status == 200:
            expect(figure).to_be_visible()
            assert figure.evaluate("img => img.naturalWidth") > 0
        else:
            assert status == 404
            expect(figure).to_have_count(0)

    page.get_by_role("link", name="All jobs").click()
    expect(row.locator(".status")).to_have_text("succeeded")
    assert page.evaluate("window.sameDocument") is True
    offline.assert_offline()


def test_uploads_through_the_file_inputs(
    idle_service: Service, offline: OfflinePage, resnet_pt2: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = offline.page
    page.goto(url(idle_service, "/ui#/uploads"))
    models = page.locator("#models")
    models.get_by_label("File").set_input_files(resnet_pt2)
    models.get_by_label("Name (optional)").fill("from-the-browser")
    models.get_by_role("button", name="Upload").click()
    expect(models.locator(".ok")).to_contain_text("Uploaded")
    (uploaded,) = [
        m
        for m in idle_service.client.get("/v1/models").json()["items"]
        if m["name"] == "from-the-browser"
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
    (dataset,) = idle_service.client.get("/v1/datasets").json()["items"]
    assert dataset["num_samples"] == 12
    expect(datasets.locator(f"tr[data-id='{dataset['id']}']")).to_be_visible()

    # A file Shears refuses: the problem's title and detail are shown, nothing is added.
    bogus = tmp_path / "notes.pt2"
    bogus.write_text("not a model")
    before = len(idle_service.client.get("/v1/models").json()["items"])
    models.get_by_label("File").set_input_files(bogus)
    models.get_by_role("button", name="Upload").click()
    problem = idle_service.client.post(
        "/v1/models", files={"file": ("notes.pt2", b"not a model")}
    ).json()
    expect(models.get_by_role("alert")).to_contain_text(problem["detail"])
    assert len(idle_service.client.get("/v1/models").json()["items"]) == before
    offline.assert_offline()


def test_names_render_as_text(
    idle_service: Service, offline: OfflinePage, resnet_pt2: Path
) -> None:
    from playwright.sync_api import expect

    name = '<img src=x onerror="window.injected = 1">'
    model = upload_model(idle_service, resnet_pt2, name=name)
    job = idle_service.client.post("/v1/jobs", json={**global_l1(model["id"]), "name": name})
    assert job.status_code == 202, job.text

    page = offline.page
    page.goto(url(idle_service, "/ui#/uploads"))
    expect(page.locator(f"tr[data-id='{model['id']}'] td.name")).to_have_text(name)
    page.goto(url(idle_service, "/ui#/jobs"))
    expect(page.locator(f"tr[data-job-id='{job.json()['id']}']")).to_contain_text(name)
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("window.injected") is None
    offline.assert_offline()


def test_asks_for_a_key_when_auth_is_on(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    offline: OfflinePage,
    resnet_pt2: Path,
) -> None:
    from playwright.sync_api import expect

    svc = start_service(
        request, tmp_path_factory, "embedded", with_worker=False, SHEARS_API_KEYS=f"acme:{KEY}"
    )
    try:
        with svc.as_tenant(KEY) as acme, resnet_pt2.open("rb") as f:
            response = acme.post("/v1/models", files={"file": ("r.pt2", f)}, data={"name": "ours"})
            assert response.status_code == 201, response.text
        page = offline.page
        sent: list[str | None] = []
        page.on(
            "request",
            lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None,
        )
        page.goto(url(svc, "/ui#/uploads"))
        dialog = page.get_by_role("dialog")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text("Send an API key")

        dialog.get_by_label("Key").fill("wrong")
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_contain_text("unknown or revoked")

        dialog.get_by_label("Key").fill(KEY)
        dialog.get_by_label("Remember in this browser").check()
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#models td.name")).to_have_text("ours")
        assert f"Bearer {KEY}" in sent
        assert page.evaluate("localStorage.getItem('shears.apiKey')") == KEY

        page.reload()  # remembered: no prompt
        expect(page.locator("#models td.name")).to_have_text("ours")
        expect(dialog).to_be_hidden()
        offline.assert_offline()
    finally:
        svc.stop()
