"""Small typed JSON accessors: every malformed shape becomes InvalidArchive, never a KeyError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import InvalidArchive


def json_obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArchive(f"{where} must be a JSON object.")
    return value


def json_list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArchive(f"{where} must be a JSON list.")
    return value


def json_key(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise InvalidArchive(f"{where} has no {key!r}.")
    return obj[key]


def json_int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArchive(f"{where} must be an integer.")
    return value


def json_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArchive(f"{where} must be a string.")
    return value
