"""What every test tier checks of an error: RFC 9457 problem details."""

from __future__ import annotations

from typing import Any


def assert_problem(response: Any, status: int, slug: str) -> dict:
    """The response is a problem+json of ``status`` and type ``slug``, with a title and a detail
    a person can act on; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body
