"""Recognising a file from its first bytes (core.formats.pt2.sniff)."""

from __future__ import annotations

import pytest

from core.formats.pt2.sniff import detect_format


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"PK\x03\x04\x00\x00\x08\x08", "zip"),
        (b"\x80\x02\x8a\nl\xfc\x9cF", "pickle"),
        (b"\x80\x04\x95\x16\x05\x00\x00\x00", "pickle"),
        (b"(dp0\nVa\n", "pickle"),
        (b"]q\x00(K\x01K\x02", "pickle"),
        (b"cos\nsyst", "pickle"),
        (b"\x89PNG\r\n\x1a\n", "unknown"),
        (b"Hello, w", "unknown"),
        (b"", "unknown"),
    ],
)
def test_detect_format(head: bytes, kind: str) -> None:
    assert detect_format(head) == kind
