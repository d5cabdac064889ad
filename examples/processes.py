"""Run Shears locally as real processes, API (uvicorn), worker (Celery) and sweeper, each service
with its own data dir, database and queue; and the local PostgreSQL and Redis to put it on. The
e2e tests and ``bench/service.py`` both start services through this module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shears.cli import api_command, notify_worker_command, sweeper_command, worker_command

ROOT = Path(__file__).resolve().parents[1]
# Test and benchmark harness settings, not the service's: read here, not through Settings.
PG_ADMIN_URL = os.environ.get(  # noqa: TID251
    "SHEARS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SHEARS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")  # noqa: TID251


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server at ``server_url`` for the generator's life, dropped after."""
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


@contextlib.contextmanager
def service_backend(backend: str) -> Iterator[tuple[str | None, str | None]]:
    """``(database URL, broker URL)`` for a benchmark's service: ``"embedded"`` gives
    ``(None, None)`` (SQLite and the in-process transport), ``"postgres+redis"`` a private
    database on the shared PostgreSQL, dropped on exit, and the shared Redis."""
    if backend == "embedded":
        yield None, None
        return
    if backend != "postgres+redis":
        raise ValueError(f"unknown backend {backend!r}")
    database = private_database(PG_ADMIN_URL)
    try:
        yield next(database), REDIS_URL
    finally:
        next(database, None)


@dataclass
class Service:
    """A running API and worker on one backend; ``client`` talks to the API."""

    data_dir: Path
    env: dict[str, str]
    port: int
    with_worker: bool = True
    api_workers: int = 1
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def as_tenant(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            timeout=60,
            headers={"Authorization": f"Bearer {key}"},
        )

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def database_url(self) -> str:
        return self.env.get("SHEARS_DATABASE_URL") or f"sqlite:///{self.data_dir / 'shears.db'}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.data_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "shears.cli", "migrate"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
        )
        self._spawn("api", api_command("127.0.0.1", self.port, self.api_workers))
        self._spawn("sweeper", sweeper_command())
        self.start_notify_worker()
        if self.with_worker:
            self.start_worker()
        self.wait_ready()

    def start_worker(self, name: str = "worker", queues: str | None = None) -> None:
        """Start a worker process (``shears worker``) named ``name`` on ``queues`` (default: the
        service's queue); several may run side by side."""
        self._spawn(name, worker_command(queues or self.env["SHEARS_QUEUE"]))

    def start_notify_worker(self) -> None:
        self._spawn("notify", notify_worker_command(self.env["SHEARS_NOTIFY_QUEUE"], 4))

    def stop_process(self, name: str, sig: int = 15) -> None:
        """Stop one process (and its children) and wait for it."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")
            try:
                last = self.client.get("/readyz")
                if last.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"service not ready: {last and last.text}\n{self.logs('api')}")

    def logs(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process: SIGTERM, then SIGKILL for whatever still runs after ``grace``
        seconds in all (a worker's warm shutdown would otherwise finish its running job)."""
        self.client.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()

    def cancel_unfinished(self, client: httpx.Client | None = None, timeout: float = 60) -> None:
        """Cancel every queued or running job (of ``client``'s tenant) and wait until each has
        ended, so that the next user of this service finds its worker idle."""
        client = client or self.client
        for status in ("running", "queued"):
            listed = client.get("/v1/jobs", params={"status": status, "limit": 200})
            if listed.status_code != 200:  # a service with API keys: its tests own their jobs
                return
            for job in listed.json()["items"]:
                client.post(f"/v1/jobs/{job['id']}/cancel")
                self.wait_for_job(job["id"], timeout=timeout, client=client)

    def wait_for_job(
        self, job_id: str, timeout: float = 180, client: httpx.Client | None = None
    ) -> dict:
        client = client or self.client
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job['status']}\n{self.logs('worker')}")


def service_env(
    data_dir: Path, port: int, database_url: str | None, broker_url: str | None, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEARS_")}  # noqa: TID251
    defaults = {
        "SHEARS_DATA_DIR": str(data_dir),
        "SHEARS_PORT": str(port),
        "SHEARS_QUEUE": f"shears-test-{uuid.uuid4().hex[:8]}",
        "SHEARS_NOTIFY_QUEUE": f"shears-test-notify-{uuid.uuid4().hex[:8]}",
        "SHEARS_LATENCY_REPEATS": "3",
        "SHEARS_LATENCY_WARMUP": "1",
        "SHEARS_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024),
        "SHEARS_JOB_LEASE_SECONDS": "10",
        "SHEARS_SWEEP_INTERVAL_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({**defaults, **extra})
    if database_url:
        env["SHEARS_DATABASE_URL"] = database_url
    if broker_url:
        env["SHEARS_BROKER_URL"] = broker_url
    return env
