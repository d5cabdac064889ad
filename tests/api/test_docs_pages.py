"""/docs, /redoc and /ui name only assets the API serves itself (the browser tier,
``tests/e2e/test_dashboard.py``, renders them in Chromium with the network cut off)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from api.docs_pages import STATIC_DIR
from tests.api.conftest import Api, MakeApi

PAGES = ["/docs", "/redoc", "/ui"]


@pytest.fixture(scope="module")
def backend() -> str:
    return "sqlite"  # pages and files: nothing here touches the database


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value and tag != "a":
                self.urls.append(value)


def assets(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.urls


def module_imports(path: str, api: Api) -> set[str]:
    """Every ES module the dashboard loads, following relative imports from ``path``."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        response = api.client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"].startswith("text/javascript"), url
        base = url.rsplit("/", 1)[0]
        todo += [f"{base}/{name}" for name in re.findall(r'from "\./([\w.]+)"', response.text)]
    return seen


@pytest.mark.parametrize("page", PAGES)
def test_pages_load_only_their_own_assets(api: Api, page: str) -> None:
    response = api.client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    # The browser itself refuses anything from another origin, and inline scripts but the page's.
    directives = response.headers["content-security-policy"].split(";")
    policy = {name: value for name, _, value in (d.strip().partition(" ") for d in directives)}
    assert policy["default-src"] == "'self'"
    assert "unsafe-inline" not in policy.get("script-src", "")
    urls = assets(response.text)
    assert urls
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url}"
        assert not url.startswith("//"), f"{page} loads {url}"
        assert api.client.get(url).status_code == 200, url
    assert "googleapis" not in response.text


def test_dashboard_scripts_are_served_as_modules(api: Api) -> None:
    loaded = module_imports("/static/ui/app.js", api)
    assert {"/static/ui/api.js", "/static/ui/live.js", "/static/ui/dom.js"} <= loaded


def test_dashboard_never_parses_api_data_as_markup() -> None:
    for script in (STATIC_DIR / "ui").glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in source, f"{script.name} uses {sink}"


def test_vendored_bundles_keep_their_licences() -> None:
    for bundle in ("swagger-ui/swagger-ui-bundle.js", "redoc/redoc.standalone.js"):
        path = STATIC_DIR / "vendor" / bundle
        assert path.stat().st_size > 100_000
        assert (path.parent / "LICENSE").read_text().strip()


def test_pages_stay_open_when_auth_is_on(make_api: MakeApi) -> None:
    secured = make_api(api_keys="acme:dashboard-key")
    assert secured.client.get("/v1/jobs").status_code == 401
    for page in PAGES:
        assert secured.client.get(page).status_code == 200, page
    paths = secured.client.get("/openapi.json").json()["paths"]
    assert not {"/docs", "/redoc", "/ui"} & set(paths)
