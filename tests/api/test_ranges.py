"""The one-range ``Range`` parser the API streams object-storage downloads with (RFC 9110)."""

from __future__ import annotations

import pytest

from api.ranges import Unsatisfiable, parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=9-3", None),  # invalid: the whole body
        ("bytes=0-1,5-6", None),  # several ranges: served whole, as RFC 9110 allows
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, 100)
