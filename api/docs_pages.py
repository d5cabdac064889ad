"""``/docs``, ``/redoc`` and the static assets they and ``/ui`` load, all served by the API.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google), so
they are blank where the deployment has no internet access. Here both come from copies vendored
under ``api/static/vendor`` (with their licences; ``api/static/vendor/README.md`` says where from),
and each page carries a Content-Security-Policy that lets it load nothing from another origin:
even a URL baked into a bundle (ReDoc's footer logo) is never requested.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
STATIC_URL = "/static"
VENDOR_URL = f"{STATIC_URL}/vendor"

# Swagger UI's configuration is an inline script (allowed by its hash, nothing else inline runs)
# and both bundles inject inline styles; ReDoc's search runs in a Web Worker built from a blob:
# URL. Nothing may come from another origin.
_DOCS_CSP = (
    "default-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self' data:",
    "worker-src 'self' blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'self'",
)
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _with_csp(page: HTMLResponse) -> Callable[[], HTMLResponse]:
    """A route handler serving ``page`` under a policy that runs the page's own inline scripts
    (by hash) and nothing else inline."""
    body = bytes(page.body).decode()
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(body)
    ]
    headers = {
        "Content-Security-Policy": "; ".join((*_DOCS_CSP, " ".join(("script-src 'self'", *hashes))))
    }

    def serve() -> HTMLResponse:
        return HTMLResponse(body, headers=headers)

    return serve


def install_docs_pages(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Serve ``/static`` and the offline ``/docs`` and ``/redoc`` on ``app`` (created with
    ``docs_url=None, redoc_url=None``)."""
    title = f"{app.title} - API docs"
    favicon = f"{VENDOR_URL}/swagger-ui/favicon-32x32.png"
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    swagger_ui = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=title,
        swagger_js_url=f"{VENDOR_URL}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR_URL}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=favicon,
        # The default validator is swagger.io's online one.
        swagger_ui_parameters={"validatorUrl": None},
    )
    redoc = get_redoc_html(
        openapi_url=openapi_url,
        title=title,
        redoc_js_url=f"{VENDOR_URL}/redoc/redoc.standalone.js",
        redoc_favicon_url=favicon,
        with_google_fonts=False,
    )
    app.get("/docs", include_in_schema=False)(_with_csp(swagger_ui))
    app.get("/redoc", include_in_schema=False)(_with_csp(redoc))
