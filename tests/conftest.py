"""Shared fixtures: real PostgreSQL and Redis (required when CI=true), free ports."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest

from examples.processes import PG_ADMIN_URL, REDIS_URL, free_port, private_database

__all__ = ["IN_CI", "PG_ADMIN_URL", "REDIS_URL", "free_port", "unavailable"]

IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for everything the test process computes, however the suite is
    invoked: float results (a trained fixture model, and so a search's allocation) then do not
    depend on which modules were collected or run alone."""
    import torch

    torch.set_num_threads(1)


def unavailable(what: str, exc: BaseException) -> None:
    """Skip on a developer machine without the service; fail in CI, where it must exist."""
    message = f"{what} unavailable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI=true: the suite must run against it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        unavailable("PostgreSQL", exc)
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[str]:
    """A fresh, private database on the shared server, dropped afterwards."""
    yield from private_database(pg_server)


@pytest.fixture(scope="session")
def make_pg_database(pg_server: str) -> Iterator[Callable[[], str]]:
    """Make private databases on demand; all are dropped when the session ends."""
    made: list[Iterator[str]] = []

    def make() -> str:
        generator = private_database(pg_server)
        made.append(generator)
        return next(generator)

    yield make
    for generator in made:
        with contextlib.suppress(StopIteration):
            next(generator)


@pytest.fixture(scope="session")
def redis_server() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        unavailable("Redis", exc)
    return REDIS_URL
