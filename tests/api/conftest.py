"""The in-process API tier: ``api.main.create_app()`` driven through Starlette's TestClient, on a
migrated SQLite file (and PostgreSQL: required when CI=true), with Celery publishing to kombu's
in-memory broker and no worker. Jobs stay as the API leaves them; finished ones are written as
rows (``tests.api.rows``). Fast: ``pytest tests/api tests/core``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from shears.db.migrate import upgrade
from shears.settings import Settings
from shears.storage import LocalStorage
from tests.bodies import global_l1
from tests.factories import export_resnet

__all__ = ["Api", "MakeApi", "global_l1", "upload"]

BACKENDS = ["sqlite", "postgres"]


@dataclass
class Api:
    """An app, a client of it, its settings and its database sessions."""

    app: FastAPI
    client: TestClient
    settings: Settings

    @property
    def sessions(self) -> sessionmaker[Session]:
        sessions: sessionmaker[Session] = self.app.state.sessions
        return sessions

    @property
    def storage(self) -> LocalStorage:
        storage: LocalStorage = self.app.state.storage
        return storage

    @property
    def storage_dir(self) -> Path:
        return self.settings.resolved_storage_dir

    def as_tenant(self, key: str) -> httpx.Client:
        client = TestClient(self.app, headers={"Authorization": f"Bearer {key}"})
        return client

    def stored_files(self) -> set[Path]:
        return {p for p in self.storage_dir.rglob("*") if p.is_file() and ".probe" not in p.name}


MakeApi = Callable[..., Api]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def make_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, backend: str
) -> Iterator[MakeApi]:
    """Make apps on this module's backend, each with its own database and storage, and settings
    (``Settings`` fields) on top of the tier's."""
    stack: list[TestClient] = []

    def make(**overrides: object) -> Api:
        data_dir = tmp_path_factory.mktemp(f"api-{backend}")
        database_url = (
            request.getfixturevalue("make_pg_database")() if backend == "postgres" else None
        )
        fields: dict[str, object] = {
            "data_dir": data_dir,
            "database_url": database_url,
            "broker_url": "memory://",
            "max_upload_bytes": 4 * 1024 * 1024,
        }
        settings = Settings(**{**fields, **overrides})  # type: ignore[arg-type]
        upgrade(settings.resolved_database_url)
        app = create_app(settings)
        client = TestClient(app)
        client.__enter__()
        stack.append(client)
        return Api(app=app, client=client, settings=settings)

    yield make
    for client in reversed(stack):
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    """The module's app: open (no API keys), default limits."""
    return make_api()


@pytest.fixture(scope="session")
def resnet_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_resnet(tmp_path_factory.mktemp("models") / "resnet.pt2")


def upload(client: httpx.Client, path: Path, collection: str = "models") -> dict:
    with path.open("rb") as f:
        response = client.post(f"/v1/{collection}", files={"file": (path.name, f)})
    assert response.status_code == 201, response.text
    return response.json()
