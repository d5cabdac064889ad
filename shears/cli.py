"""``shears``: run the service, apply migrations, manage keys; and the API client commands
(``models``, ``datasets``, ``jobs``) on :class:`shears.client.Client`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from sqlalchemy.orm import Session, sessionmaker

from shears.auth import InvalidKeySpec, create_key, list_keys, revoke_key
from shears.client import DEFAULT_URL, Client, ShearsAPIError, ShearsClientError
from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from shears.settings import get_settings

app = typer.Typer(help="Shears: pruning as a service.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: each belongs to one tenant.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
models_app = typer.Typer(help="Upload models (a running API).", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload datasets (a running API).", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Submit, follow and download jobs (a running API).", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")


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
        for queue in (settings.queue, settings.notify_queue):
            _declare_embedded_queue(settings.resolved_broker_url, queue)


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


def worker_command(queue: str, concurrency: int = 1) -> list[str]:
    """``shears worker`` on ``queue`` (comma-separated for several) as a process to start."""
    return [
        sys.executable,
        "-m",
        "shears.cli",
        "worker",
        "--queues",
        queue,
        "--concurrency",
        str(concurrency),
    ]


def celery_worker_argv(queues: list[str], concurrency: int, node: str) -> list[str]:
    # mingle and gossip use broadcast messages, which kombu's SQLAlchemy transport cannot carry;
    # Celery's own heartbeats likewise (the worker's presence is a row in the database instead).
    return [
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "-Q",
        ",".join(queues),
        "-n",
        node,
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]


def notify_worker_command(queue: str, concurrency: int) -> list[str]:
    # Its own app (no job code, no torch) and threads: deliveries wait on the network, and a slow
    # receiver holds one thread, not the others.
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.notify_app",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--pool",
        "threads",
        "-Q",
        queue,
        "-n",
        "notify@%h",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]


def _queue_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    queues = [q.strip() for q in value.split(",") if q.strip()]
    if not queues or any(
        not q.replace("-", "").replace("_", "").replace(".", "").isalnum() for q in queues
    ):
        raise typer.BadParameter(
            "a comma-separated list of queue names (letters, digits, - _ .)", param_hint="--queues"
        )
    return queues


@app.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues to consume. Default: SHEARS_QUEUE, plus "
            "SHEARS_GPU_QUEUE when CUDA is visible."
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Pool processes (one job each). Default: one per visible GPU on the GPU "
            "queue, else 1.",
        ),
    ] = None,
) -> None:
    """Run a worker: one Celery node per process (``shears-<pid>@<host>``), pool children pinned
    to one GPU each when it consumes the GPU queue."""
    from worker.celery_app import app as celery
    from worker.devices import check_device_string, default_queues, visible_gpus
    from worker.presence import node_name
    from worker.signals import GPUS_CONF_KEY

    settings = get_settings()
    try:
        check_device_string(settings.train_device)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    gpus = visible_gpus()
    chosen = _queue_list(queues) or default_queues(settings, gpus)
    gpu_work = settings.gpu_queue in chosen and bool(gpus)
    processes = concurrency or (len(gpus) if gpu_work else 1)
    if gpu_work:
        celery.conf[GPUS_CONF_KEY] = gpus
    celery.worker_main(argv=celery_worker_argv(chosen, processes, node_name()))


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
    """Migrate, then run the API, one worker, the notify worker (webhooks) and the sweeper until
    Ctrl-C (`make run`)."""
    settings = get_settings()
    migrate()
    procs = [
        subprocess.Popen(api_command(settings.host, settings.port)),
        subprocess.Popen(worker_command(settings.queue)),
        subprocess.Popen(notify_worker_command(settings.notify_queue, settings.notify_concurrency)),
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


# -- the API client commands ---------------------------------------------------------------------
# They talk to a running API over HTTP and never touch the database. SHEARS_URL / SHEARS_API_KEY
# are the client's environment, read by typer (not Settings: those configure the service).

EXIT_ERROR = 1  # the API refused, or could not be reached
EXIT_JOB_FAILED = 3  # --wait: the job finished failed or cancelled (2 is typer's usage error)

Url = Annotated[
    str, typer.Option("--url", envvar="SHEARS_URL", help="The Shears API.", show_default=True)
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="SHEARS_API_KEY", help="Bearer key, when auth is on."),
]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print exactly one JSON document: the response body.")
]
Upload = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The file to upload.")
]
Name = Annotated[str | None, typer.Option("--name", help="A label (default: the file name).")]
Wait = Annotated[
    bool, typer.Option("--wait", help="Follow the job to its end; exit 3 unless it succeeds.")
]


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[Client]:
    """A client whose failures end the command: the problem's detail on stderr, exit 1."""
    try:
        with Client(url, api_key=api_key) as client:
            yield client
    except ShearsAPIError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        # The detail names the first invalid field; list them all when there are more.
        for error in exc.errors if exc.errors and len(exc.errors) > 1 else []:
            where = ".".join(str(p) for p in error.get("loc", []) if p != "body")
            typer.echo(f"  {where}: {error.get('msg', '')}", err=True)
        raise typer.Exit(EXIT_ERROR) from exc
    except ShearsClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from exc
    except httpx.TransportError as exc:
        typer.echo(f"error: cannot reach Shears at {url}: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from exc


def _emit(body: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    typer.echo(json.dumps(body) if as_json else human(body))


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows if v is not None)


def _upload_text(body: dict[str, Any]) -> str:
    count = (
        ("parameters", f"{body['num_parameters']:,}")
        if "num_parameters" in body
        else ("samples", f"{body.get('num_samples', 0):,}")
    )
    return _table(
        [
            ("id", body["id"]),
            ("name", body.get("name")),
            ("format", body.get("format")),
            count,
            ("size", f"{body['size_bytes']:,} bytes"),
            ("sha256", body.get("sha256")),
        ]
    )


def _before_after(metrics: dict[str, Any], key: str, unit: str = "") -> str | None:
    before, after = metrics.get(f"{key}_before"), metrics.get(f"{key}_after")
    if before is None and after is None:
        return None
    return f"{_number(before)} -> {_number(after)}{unit}"


def _number(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def _job_text(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    metrics = job.get("metrics") or {}
    error = job.get("error")
    sparsity = metrics.get("sparsity")
    evals = [
        f"{label} {json.dumps(metrics[key])}"
        for key, label in (
            ("eval_before", "before"),
            ("eval_after_pruning", "after pruning"),
            ("eval_after_fine_tune", "after fine-tune"),
        )
        if metrics.get(key) is not None
    ]
    rows: list[tuple[str, object]] = [
        ("job", job["id"]),
        ("status", f"{job['status']} ({progress.get('stage')}, {progress.get('fraction', 0):.0%})"),
        ("model", job.get("model_id")),
        ("error", f"{error['type']}: {error['message']}" if error else None),
        ("sparsity", f"{sparsity:.4f}" if sparsity is not None else None),
        ("params", _before_after(metrics, "params")),
        ("macs", _before_after(metrics, "macs")),
        ("size", _before_after(metrics, "size_bytes", " bytes")),
        ("latency", _before_after(metrics, "latency_ms", " ms")),
        ("eval", "; ".join(evals) or None),
        ("result", job.get("result_model_id")),
    ]
    rows += [
        (f"artifact {a['kind']}", f"{a['format']}, {a['size_bytes']:,} bytes, {a['download_url']}")
        for a in job.get("artifacts") or []
    ]
    return _table(rows)


@models_app.command("upload")
def models_upload(
    file: Upload,
    name: Name = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    json_: AsJson = False,
) -> None:
    """Upload a model (torch.export .pt2, or a save_pretrained archive) and print it."""
    with _client(url, api_key) as client:
        body = client.upload_model(file, name=name)
    _emit(body, json_, _upload_text)


@datasets_app.command("upload")
def datasets_upload(
    file: Upload,
    name: Name = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    json_: AsJson = False,
) -> None:
    """Upload a dataset (.npz, .safetensors, .txt, .jsonl) and print it."""
    with _client(url, api_key) as client:
        body = client.upload_dataset(file, name=name)
    _emit(body, json_, _upload_text)


@jobs_app.command("submit")
def jobs_submit(
    model: Annotated[str, typer.Option("--model", help="The model id to prune.")],
    criterion: Annotated[str, typer.Option(help="l1, l2, lamp, taylor, wanda, … (see README).")],
    granularity: Annotated[
        str, typer.Option(help="unstructured, channel, head, n:m, block, width, depth.")
    ],
    sparsity: Annotated[
        float | None, typer.Option(help="Fraction removed (0 <= s < 1).", show_default=False)
    ] = None,
    target_macs: Annotated[
        float | None,
        typer.Option(help="Instead of --sparsity: keep at most this fraction of the MACs."),
    ] = None,
    scope: Annotated[str | None, typer.Option(help="layer (API default) or global.")] = None,
    fine_tune: Annotated[
        str | None, typer.Option("--fine-tune", help="Dataset id to fine-tune on.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs.")] = None,
    evaluation: Annotated[
        str | None, typer.Option("--eval", help="Dataset id to score on.")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option(help="Dataset id for data-aware criteria.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; prune nothing.")] = False,
    name: Annotated[str | None, typer.Option(help="A label for the job.")] = None,
    wait: Wait = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    json_: AsJson = False,
) -> None:
    """Submit a pruning job and print it (with --wait: its final state)."""
    if sparsity is not None and target_macs is not None:
        raise typer.BadParameter("give --sparsity or --target-macs, not both")
    if epochs is not None and fine_tune is None:
        raise typer.BadParameter("--epochs needs --fine-tune DATASET", param_hint="--epochs")
    pruning: dict[str, Any] = {"criterion": criterion, "granularity": granularity}
    if sparsity is not None:
        pruning["sparsity"] = sparsity
    if target_macs is not None:
        pruning["target"] = {"macs": target_macs}
    if scope is not None:
        pruning["scope"] = scope
    with _client(url, api_key) as client:
        job = client.submit(
            model,
            pruning=pruning,
            fine_tune=None
            if fine_tune is None
            else {"dataset_id": fine_tune, **({"epochs": epochs} if epochs is not None else {})},
            evaluation=None if evaluation is None else {"dataset_id": evaluation},
            calibration=None if calibration is None else {"dataset_id": calibration},
            dry_run=dry_run,
            name=name,
        )
        job = _follow(client, job, wait)
    _report(job, wait, json_)


def _follow(client: Client, job: dict[str, Any], wait: bool) -> dict[str, Any]:
    """With ``wait``, the job's final body (a progress bar on a terminal); else ``job``."""
    if not wait:
        return job
    try:
        return client.wait(job["id"])
    except KeyboardInterrupt:
        typer.echo(f"stopped waiting; job {job['id']} goes on (shears jobs get --wait)", err=True)
        raise typer.Exit(130) from None


def _report(job: dict[str, Any], wait: bool, as_json: bool) -> None:
    """Print the job; after ``wait``, exit 3 unless it succeeded, saying why on stderr."""
    _emit(job, as_json, _job_text)
    if wait and job["status"] != "succeeded":
        error = job.get("error") or {}
        reason = f": {error.get('type')}: {error.get('message')}" if error else ""
        typer.echo(f"job {job['id']} {job['status']}{reason}", err=True)
        raise typer.Exit(EXIT_JOB_FAILED)


@jobs_app.command("get")
def jobs_get(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    wait: Wait = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    json_: AsJson = False,
) -> None:
    """Print a job: status, progress, metrics, error, artifacts (with --wait: once finished)."""
    with _client(url, api_key) as client:
        job = _follow(client, client.get_job(job_id), wait)
    _report(job, wait, json_)


@jobs_app.command("download")
def jobs_download(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    output: Annotated[
        Path, typer.Option("-o", "--output", dir_okay=False, help="Where to save the file.")
    ],
    kind: Annotated[str, typer.Option(help="model, weights or report.")] = "model",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    json_: AsJson = False,
) -> None:
    """Download a job's artifact (resuming a partial file) and check its sha256."""
    with _client(url, api_key) as client:
        path = client.download(job_id, kind=kind, path=output)
        job = client.get_job(job_id) if json_ else {}
    _emit(job, json_, lambda _: f"saved {path} (sha256 verified)")


if __name__ == "__main__":
    app()
