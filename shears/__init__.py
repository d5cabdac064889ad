"""The service layer shared by the API and the worker: settings, persistence, storage, CLI; and
the Python client of the API (``shears.Client``).

Nothing in this package imports FastAPI: the worker imports it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shears.client import Client, ShearsAPIError

__all__ = ["Client", "ShearsAPIError"]


def __getattr__(name: str) -> Any:
    # Lazily: the API and the worker import this package for settings and persistence, and
    # should not pay for the client's HTTP stack.
    if name in __all__:
        from shears import client

        return getattr(client, name)
    raise AttributeError(f"module 'shears' has no attribute {name!r}")
