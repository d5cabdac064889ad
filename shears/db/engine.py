"""Engines and sessions: one engine per process (the worker makes a fresh one after fork)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, pre_ping: bool = True) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and enforced foreign keys.

    ``pre_ping=False`` saves a round trip per checkout; its callers must retry a statement that
    fails on a connection the database dropped (see ``api.routes.jobs``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while the worker writes; the busy timeout makes writers queue
            # instead of failing with "database is locked".
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # pre_ping: a connection that died while the database restarted is replaced, not returned.
    return create_engine(url, pool_pre_ping=pre_ping, pool_recycle=1800)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def autocommit(engine: Engine) -> Engine:
    """The same pool, without transactions: a read that is one statement needs no BEGIN and no
    ROLLBACK round trip (the statement is its own snapshot)."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")
