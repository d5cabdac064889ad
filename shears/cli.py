"""``shears``: run the service, apply migrations."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Annotated

import typer
from sqlalchemy.orm import Session, sessionmaker

from shears.auth import InvalidKeySpec, create_key, list_keys, revoke_key
from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from shears.settings import get_settings

app = typer.Typer(help="Shears: pruning as a service.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: each belongs to one tenant.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _sessions() -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(get_settings().resolved_database_url))


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")]) -> None:
    """Create a key and print it once (only its hash is stored)."""
    try:
        with _sessions().begin() as session:
            row, key = create_key(session, tenant)
    except InvalidKeySpec as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from exc
    typer.echo(f"id:     {row.id}\ntenant: {row.tenant}\nkey:    {key}")
    typer.echo("Keep the key now: Shears stores only its hash and cannot show it again.", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List keys: id, tenant, prefix, created, revoked."""
    with _sessions()() as session:
        for row in list_keys(session):
            revoked = row.revoked_at.isoformat() if row.revoked_at else "-"
            typer.echo(
                f"{row.id}\t{row.tenant}\t{row.prefix}…\t{row.created_at.isoformat()}\t{revoked}"
            )


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id; requests with it get 401 from then on."""
    with _sessions().begin() as session:
        if not revoke_key(session, key_id):
            typer.echo(f"no active key with id {key_id}", err=True)
            raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command()
def migrate() -> None:
    """Bring the database schema to the latest revision (alembic upgrade head)."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    typer.echo("database at head")
    if settings.resolved_broker_url.startswith("sqla+"):
        _declare_embedded_queue(settings.resolved_broker_url, settings.queue)


def _declare_embedded_queue(broker_url: str, queue: str) -> None:
    # kombu's SQLAlchemy transport creates its tables and the queue's row on first use, without
    # handling a concurrent creator: an API publishing and a worker starting at the same moment
    # can collide on the row and leave the worker without its queue. Create them once, here,
    # before either process starts.
    from kombu.connection import Connection

    with Connection(broker_url) as connection:  # type: ignore[no-untyped-call]
        connection.default_channel.queue_declare(queue=queue)


def api_command(host: str, port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.main:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        *(["--workers", str(workers)] if workers > 1 else []),
    ]


def worker_command(queue: str) -> list[str]:
    # mingle and gossip use broadcast messages, which kombu's SQLAlchemy transport cannot carry;
    # concurrency 1: one job at a time per worker (one GPU per process in production).
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "-Q",
        queue,
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]


def sweeper_command() -> list[str]:
    return [sys.executable, "-m", "shears.cli", "sweeper"]


@app.command()
def sweeper() -> None:
    """Publish again the jobs a lost message or a dead worker left behind (runs until stopped)."""
    import threading

    from shears.logs import configure_logging
    from worker.celery_app import create_celery
    from worker.sweeper import run_forever

    settings = get_settings()
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_forever(create_celery(settings), settings, stop)


@app.command()
def serve() -> None:
    """Migrate, then run the API, one worker and the sweeper until Ctrl-C (`make run`)."""
    settings = get_settings()
    migrate()
    procs = [
        subprocess.Popen(api_command(settings.host, settings.port)),
        subprocess.Popen(worker_command(settings.queue)),
        subprocess.Popen(sweeper_command()),
    ]
    typer.echo(
        f"Shears API on http://{settings.host}:{settings.port} (docs at /docs); Ctrl-C stops"
    )
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
    code = next((p.returncode for p in procs if p.returncode not in (0, None, -15)), 0)
    raise typer.Exit(0 if stopping else (code or 1))


if __name__ == "__main__":
    app()
