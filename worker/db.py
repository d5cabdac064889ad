"""The worker's database engine: one per process, made after fork (a forked pool must never
share the parent's connections), disposed when the child exits."""

from __future__ import annotations

import os

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shears.db.engine import make_engine, make_sessionmaker
from shears.settings import get_settings

_engine: Engine | None = None
_sessions: sessionmaker[Session] | None = None
_pid: int | None = None


def sessions() -> sessionmaker[Session]:
    global _engine, _sessions, _pid
    if _sessions is None or _pid != os.getpid():
        if _engine is not None:
            # Inherited from the parent: drop its pool without closing the parent's sockets.
            _engine.dispose(close=False)
        _engine = make_engine(get_settings().resolved_database_url)
        _sessions = make_sessionmaker(_engine)
        _pid = os.getpid()
    return _sessions
