"""``GET /ui``: the dashboard, a static page that talks to the public ``/v1`` API from the browser.

Its scripts and styles are ``api/static/ui`` (plain ES modules, no build step). The page needs
no key to load; the browser sends the user's key with each ``/v1`` call.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.docs_pages import STATIC_DIR

router = APIRouter(include_in_schema=False)

# Only this origin's own scripts, styles and images (plots arrive as blob: URLs, fetched with the
# key); no inline script or style, so a name that slipped into the page as markup could not run.
UI_CSP = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' blob: data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


@router.get("/ui")
def dashboard() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "ui" / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": UI_CSP, "Cache-Control": "no-cache"},
    )
