"""Request dependencies: settings, the request's database session, storage, tenant, queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from shears.settings import Settings
from shears.storage import LocalStorage


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Route handlers commit (before they enqueue); an uncommitted
    session is rolled back when the request ends, so a failed request leaves no half row."""
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        yield session


def get_storage(request: Request) -> LocalStorage:
    storage: LocalStorage = request.app.state.storage
    return storage


def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


def get_tenant() -> str:
    """The caller's tenant. Without API keys the service is open and everyone is ``default``."""
    return "default"


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
TenantDep = Annotated[str, Depends(get_tenant)]
