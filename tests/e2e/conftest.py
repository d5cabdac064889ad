"""One running service per backend for the whole session: the embedded default, and PostgreSQL
with Redis (required when CI=true)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.service import Service, service_env
from tests.factories import export_resnet


@pytest.fixture(scope="session", params=["embedded", "postgres+redis"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp(f"svc-{request.param.replace('+', '-')}")
    port = free_port()
    if request.param == "embedded":
        env = service_env(data_dir, port, None, None)
    else:
        database = request.getfixturevalue("pg_database_session")
        broker = request.getfixturevalue("redis_server")
        env = service_env(data_dir, port, database, broker)
    svc = Service(data_dir=data_dir, env=env, port=port)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def resnet_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_resnet(tmp_path_factory.mktemp("models") / "resnet.pt2")
