"""``/docs``, ``/redoc`` and the static assets they and ``/ui`` load, all served by the API.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google), so
they are blank where the deployment has no internet access. Here both come from copies vendored
under ``api/static/vendor`` (with their licences; ``api/static/vendor/README.md`` says where from),
and each page carries a Content-Security-Policy that lets it load nothing from another origin:
even a URL baked into a bundle (ReDoc's footer logo) is never requested.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
STATIC_URL = "/static"
VENDOR_URL = f"{STATIC_URL}/vendor"

# Swagger UI's configuration is an inline script and both bundles inject inline styles; ReDoc's
# search runs in a Web Worker built from a blob: URL. Nothing may come from another origin.
DOCS_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'self'",
    )
)


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def install_docs_pages(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Serve ``/static`` and the offline ``/docs`` and ``/redoc`` on ``app`` (created with
    ``docs_url=None, redoc_url=None``)."""
    title = f"{app.title} - API docs"
    favicon = f"{VENDOR_URL}/swagger-ui/favicon-32x32.png"
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return _with_csp(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=title,
                swagger_js_url=f"{VENDOR_URL}/swagger-ui/swagger-ui-bundle.js",
                swagger_css_url=f"{VENDOR_URL}/swagger-ui/swagger-ui.css",
                swagger_favicon_url=favicon,
                # The default validator is swagger.io's online one.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return _with_csp(
            get_redoc_html(
                openapi_url=openapi_url,
                title=title,
                redoc_js_url=f"{VENDOR_URL}/redoc/redoc.standalone.js",
                redoc_favicon_url=favicon,
                with_google_fonts=False,
            )
        )
