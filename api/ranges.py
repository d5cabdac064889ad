"""HTTP ``Range`` requests for one byte range (RFC 9110 §14), for streams that are not files."""

from __future__ import annotations

import re

_ONE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class Unsatisfiable(Exception):
    """The range lies wholly past the end: 416."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` a ``Range`` header asks of ``size`` bytes, or None for the
    whole body: no header, a syntax this does not serve (several ranges, another unit) -- which
    RFC 9110 lets a server answer with the whole representation.

    Raises:
        Unsatisfiable: a first byte at or past the end, or a suffix of zero bytes.
    """
    if header is None:
        return None
    match = _ONE_RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored, the whole body
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)
