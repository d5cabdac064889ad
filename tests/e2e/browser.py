"""Chromium with no network but loopback, driven by Playwright (the system's Chromium: no
browser download). Every request to another host is aborted and recorded, so a test can assert
that a page loaded everything it needed from the API and tried nothing else."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.conftest import unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request, Route

INSTALL_HINT = "install it with `apt-get install -y chromium` (or set SHEARS_TEST_CHROMIUM)"
LOOPBACK = {"127.0.0.1"}
# Belt and braces under the request routing: no host name resolves except loopback.
LAUNCH_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]


def chromium_path() -> str:
    """The system's Chromium; skips without one (fails under CI=true, with the install hint)."""
    path = (
        os.environ.get("SHEARS_TEST_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path or not os.access(path, os.X_OK):
        unavailable("Chromium", FileNotFoundError(f"{path or 'chromium'}: {INSTALL_HINT}"))
    assert path is not None
    return path


@contextmanager
def launch() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # the dev extra brings it
        unavailable("Playwright", exc)
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class OfflinePage:
    """A page whose requests leave the machine only for loopback; what else it tried is kept."""

    page: Page
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page
    loaded: dict[str, int] = field(default_factory=dict)  # URL -> status, loopback responses

    def assert_offline(self) -> None:
        assert self.blocked == [], f"the page tried to reach other hosts: {self.blocked}"
        assert self.errors == [], f"the page raised: {self.errors}"


@contextmanager
def offline_page(browser: Browser, api_key: str | None = None) -> Iterator[OfflinePage]:
    """A fresh browser profile; with ``api_key``, the dashboard finds it already entered."""
    context = browser.new_context(service_workers="block", accept_downloads=True)
    if api_key is not None:
        context.add_init_script(f"sessionStorage.setItem('shears.apiKey', {json.dumps(api_key)})")
    page = context.new_page()
    result = OfflinePage(page)

    def guard(route: Route, request: Request) -> None:
        if urlsplit(request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            result.blocked.append(request.url)
            route.abort("internetdisconnected")

    context.route("**/*", guard)
    page.on("pageerror", lambda error: result.errors.append(str(error)))
    page.on("response", lambda response: result.loaded.__setitem__(response.url, response.status))
    try:
        yield result
    finally:
        context.close()
