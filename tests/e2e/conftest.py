"""Running services for the e2e tests: the embedded default, and PostgreSQL with Redis (required
when CI=true). Each service gets its own data dir, database and queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.service import Service, service_env
from tests.factories import export_resnet

BACKENDS = ["embedded", "postgres+redis"]


def start_service(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
    with_worker: bool = True,
    **extra: str,
) -> Service:
    """A service on ``backend`` ("embedded" or "postgres+redis") with extra SHEARS_ settings."""
    data_dir = tmp_path_factory.mktemp(f"svc-{backend.replace('+', '-')}")
    port = free_port()
    if backend == "embedded":
        env = service_env(data_dir, port, None, None, **extra)
    else:
        database = request.getfixturevalue("make_pg_database")()
        broker = request.getfixturevalue("redis_server")
        env = service_env(data_dir, port, database, broker, **extra)
    svc = Service(data_dir=data_dir, env=env, port=port, with_worker=with_worker)
    try:
        svc.start()
    except BaseException:
        svc.stop()
        raise
    return svc


@pytest.fixture(scope="session", params=BACKENDS)
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    svc = start_service(request, tmp_path_factory, request.param)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(autouse=True)
def _idle_worker_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves a job queued or running on the shared service has it cancelled
    afterwards: the next test (or the teardown) then never waits behind it."""
    yield
    if "service" in request.fixturenames:
        service: Service = request.getfixturevalue("service")
        service.cancel_unfinished()


@pytest.fixture(scope="session")
def resnet_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_resnet(tmp_path_factory.mktemp("models") / "resnet.pt2")
