"""Shared fixtures: real PostgreSQL and Redis (required when CI=true), free ports."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get(
    "SHEARS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SHEARS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, exc: BaseException) -> None:
    """Skip on a developer machine without the service; fail in CI, where it must exist."""
    message = f"{what} unavailable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI=true: the suite must run against it)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    yield from _private_database(pg_server)


@pytest.fixture(scope="session")
def make_pg_database(pg_server: str) -> Iterator[Callable[[], str]]:
    """Make private databases on demand; all are dropped when the session ends."""
    made: list[Iterator[str]] = []

    def make() -> str:
        generator = _private_database(pg_server)
        made.append(generator)
        return next(generator)

    yield make
    for generator in made:
        with contextlib.suppress(StopIteration):
            next(generator)


def _private_database(server_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"shears_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def redis_server() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        unavailable("Redis", exc)
    return REDIS_URL
