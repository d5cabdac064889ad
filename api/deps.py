"""Request dependencies: settings, the request's database session, storage, tenant, queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.errors import Problem
from shears.auth import KeyCheck, KeyResolver
from shears.settings import Settings
from shears.storage import Storage


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Route handlers commit (before they enqueue); an uncommitted
    session is rolled back when the request ends, so a failed request leaves no half row."""
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        yield session


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer shk_...`")


async def get_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant, from its API key. With no key configured anywhere the service is open
    (local development) and everyone is ``default``.

    Async, and without the request's session: a key seen in the last second is answered from
    memory on the event loop; only a cache miss takes a worker thread and a database session."""
    keys: KeyResolver = request.app.state.keys
    key = credentials.credentials if credentials is not None else None
    outcome = keys.peek(key)
    if outcome is None:
        outcome = await run_in_threadpool(keys.check, request.app.state.sessions, key)
    if outcome is KeyCheck.MISSING:
        raise Problem(
            401,
            "unauthorized",
            "API key required",
            "Send an API key as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if outcome is KeyCheck.INVALID:
        raise Problem(
            401,
            "unauthorized",
            "Invalid API key",
            "The API key is unknown or revoked.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return outcome


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
TenantDep = Annotated[str, Depends(get_tenant)]
