"""Service benchmarks: status-poll throughput and latency (wrk), job pick-up latency, a 1 GiB
upload's throughput and the API process's memory growth; and (``--workers``) jobs per minute with
several worker processes, with the database rows written per job and per second of a running job.

    apt-get install -y wrk          # the load tool (Debian package)
    .venv/bin/python bench/service.py --backend postgres+redis
    .venv/bin/python bench/service.py --backend embedded
    .venv/bin/python bench/service.py --api-workers 2 --runs 3 --skip-upload   # as compose runs it
    .venv/bin/python bench/service.py --workers 1,2,4 --jobs 16   # many workers: jobs/min, DB rows
    .venv/bin/python bench/service.py --s3-upload   # 1 GiB upload to object storage (moto)

On a shared machine, serialise timing runs: ``flock /tmp/shears-bench.lock .venv/bin/python ...``.

Starts the real processes (uvicorn, a Celery worker, the sweeper) exactly as the e2e tests do.
Results are printed as markdown; copy them to docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.models import export_resnet  # noqa: E402
from examples.processes import (  # noqa: E402
    PG_ADMIN_URL,
    Service,
    free_port,
    service_backend,
    service_env,
)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def api_pid(svc: Service) -> int:
    return svc.procs["api"].pid


def status_poll(
    svc: Service, job_id: str, seconds: int, connections: int, threads: int, headers: list[str]
) -> dict:
    url = f"http://127.0.0.1:{svc.port}/v1/jobs/{job_id}"
    extra = [arg for header in headers for arg in ("-H", header)]
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    percentiles = {}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        percentiles[pct] = float(value) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": percentiles["50"],
        "p99_ms": percentiles["99"],
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def status_polls(svc: Service, job_id: str, args: argparse.Namespace, headers: list[str]) -> dict:
    """``args.runs`` wrk runs back to back: the median of each figure, and every run's."""
    runs = [
        status_poll(svc, job_id, args.seconds, args.connections, args.threads, headers)
        for _ in range(args.runs)
    ]
    summary = {key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_ms", "p99_ms")}
    return {**summary, "non_2xx": sum(r["non_2xx"] for r in runs), "runs": runs}


def pick_up(svc: Service, model_id: str, jobs: int) -> list[float]:
    delays = []
    for _ in range(jobs):
        body = {
            "model_id": model_id,
            "pruning": {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5},
        }
        job = svc.wait_for_job(svc.client.post("/v1/jobs", json=body).json()["id"])
        created = datetime.fromisoformat(job["created_at"])
        started = datetime.fromisoformat(job["started_at"])
        delays.append((started - created).total_seconds() * 1000)
    return delays


def big_upload(svc: Service, workdir: Path) -> dict:
    path = workdir / "big.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(16384, 16384, bias=False))  # 1 GiB of fp32
    program = torch.export.export(
        model, (torch.randn(2, 16384),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, str(path))
    del model, program
    size = path.stat().st_size
    pid = api_pid(svc)
    before = rss_kib(pid)
    start = time.perf_counter()
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-F",
            f"file=@{path}",
            f"http://127.0.0.1:{svc.port}/v1/models",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    peak = rss_kib(pid, "VmHWM")
    return {
        "status": result.stdout,
        "bytes": size,
        "seconds": elapsed,
        "mib_per_s": size / 2**20 / elapsed,
        "rss_before_mib": before / 1024,
        "growth_mib": (peak - before) / 1024,
    }


def print_upload(upload: dict) -> None:
    print(
        f"| 1 GiB upload ({upload['bytes']} B, HTTP {upload['status']}) | "
        f"{upload['seconds']:.1f} s, {upload['mib_per_s']:.0f} MiB/s |"
    )
    print(
        f"| API RSS before / peak growth during upload | {upload['rss_before_mib']:.0f} MiB"
        f" / {upload['growth_mib']:.1f} MiB |"
    )


def print_poll(what: str, poll: dict, args: argparse.Namespace) -> None:
    runs = poll["runs"]
    median = "median of " if len(runs) > 1 else ""
    print(
        f"| {what} throughput (wrk -t{args.threads} -c{args.connections} -d{args.seconds}s, "
        f"{median}{len(runs)} run(s)) | {poll['rps']:.0f} req/s ({poll['non_2xx']} non-2xx) |"
    )
    print(f"| {what} p50 / p99 | {poll['p50_ms']:.2f} ms / {poll['p99_ms']:.2f} ms |")
    if len(runs) > 1:
        each = ", ".join(f"{r['rps']:.0f} ({r['p50_ms']:.1f}/{r['p99_ms']:.1f} ms)" for r in runs)
        print(f"| {what} each run: req/s (p50/p99) | {each} |")


# --- many workers -------------------------------------------------------------------------------


def pg_writes(database_url: str) -> int:
    """Rows the database has inserted, updated or deleted so far (pg_stat_database; a backend
    reports its counts when it goes idle or exits, hence the settling pauses around this)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
                        "WHERE datname = :name"
                    ),
                    {"name": make_url(database_url).database},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def pg_connections(database_url: str) -> int:
    """Connections open to the service's database now (pools keep theirs open between uses)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": make_url(database_url).database},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def wait_for_workers(svc: Service, count: int, timeout: float = 180) -> None:
    from sqlalchemy import create_engine, func, select

    from shears.db.tables import WorkerHeartbeat

    engine = create_engine(svc.database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                alive = conn.execute(select(func.count()).select_from(WorkerHeartbeat)).scalar()
            if alive == count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{alive} of {count} workers announced")
            time.sleep(0.5)
    finally:
        engine.dispose()


def job_seconds(job: dict) -> float:
    started = datetime.fromisoformat(job["started_at"])
    return (datetime.fromisoformat(job["finished_at"]) - started).total_seconds()


def many_workers_run(
    workdir: Path, workers: int, jobs: int, settle_s: float, fine_tune_steps: int
) -> dict:
    """``workers`` worker processes on one queue: jobs/minute over ``jobs`` small prune jobs, the
    database rows written per job and per second of a running job, and idle heartbeat writes."""
    from examples.models import make_digits

    (workdir / f"digits-{workers}").mkdir()
    digits = make_digits(workdir / f"digits-{workers}")
    cleanup = ExitStack()
    database, broker = cleanup.enter_context(service_backend("postgres+redis"))
    port = free_port()
    data = workdir / f"data-{workers}"
    data.mkdir()
    env = service_env(data, port, database, broker, SHEARS_LOG_LEVEL="WARNING")
    svc = Service(data_dir=data, env=env, port=port, with_worker=False)
    try:
        svc.start()
        for i in range(workers):
            svc.start_worker(f"worker-{i}")
        wait_for_workers(svc, workers)
        with digits.model_path.open("rb") as f:
            model = svc.client.post("/v1/models", files={"file": ("cnn.pt2", f)}).json()
        with digits.train.open("rb") as f:
            train = svc.client.post("/v1/datasets", files={"file": ("train.npz", f)}).json()
        prune = {
            "model_id": model["id"],
            "pruning": {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5},
        }
        for _ in range(workers):  # warm every worker's first-job imports
            svc.wait_for_job(svc.client.post("/v1/jobs", json=prune).json()["id"])

        time.sleep(settle_s)  # idle: only worker heartbeats write now
        idle_start = pg_writes(database)
        time.sleep(settle_s)
        idle_writes = pg_writes(database) - idle_start

        before = pg_writes(database)
        ids = [svc.client.post("/v1/jobs", json=prune).json()["id"] for _ in range(jobs)]
        done = [svc.wait_for_job(job_id, timeout=600) for job_id in ids]
        connections = pg_connections(database)
        first = min(datetime.fromisoformat(j["created_at"]) for j in done)
        last = max(datetime.fromisoformat(j["finished_at"]) for j in done)
        time.sleep(settle_s)
        batch_writes = pg_writes(database) - before
        wall = (last - first).total_seconds()

        tuned_writes = tuned_s = None
        if fine_tune_steps:
            before = pg_writes(database)
            body = {
                **prune,
                "fine_tune": {"dataset_id": train["id"], "steps": fine_tune_steps, "batch_size": 8},
            }
            tuned = svc.wait_for_job(svc.client.post("/v1/jobs", json=body).json()["id"], 600)
            time.sleep(settle_s)
            tuned_writes = pg_writes(database) - before
            tuned_s = job_seconds(tuned)
        artifact_bytes = statistics.median(
            sum(a["size_bytes"] for a in j["artifacts"]) for j in done
        )
        failed = sum(j["status"] != "succeeded" for j in done)
        busy = {j["worker"] for j in done}
    finally:
        svc.stop()
        cleanup.close()
    return {
        "workers": workers,
        "jobs": jobs,
        "failed": failed,
        "workers_used": len(busy),
        "wall_s": wall,
        "jobs_per_min": jobs / wall * 60,
        "median_job_s": statistics.median(job_seconds(j) for j in done),
        "rows_per_job": batch_writes / jobs,
        "idle_rows_per_s": idle_writes / settle_s,
        "tuned_rows": tuned_writes,
        "tuned_s": tuned_s,
        "artifact_bytes_per_job": artifact_bytes,
        "connections": connections,
    }


def many_workers(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="shears-bench-scale-"))
    results = []
    try:
        for count in args.workers:
            results.append(
                many_workers_run(
                    workdir,
                    count,
                    args.jobs,
                    args.settle,
                    args.fine_tune_steps if count == 1 else 0,
                )
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\n### Many workers, postgres+redis, {args.jobs} prune jobs (digits CNN, 50% L1) "
        f"({torch.__version__}, {datetime.now():%Y-%m-%d})\n"
    )
    print(
        "| worker processes | jobs/min | vs 1 | median job (s) | workers that ran jobs | "
        "failed | rows written per job | idle rows/s (heartbeats) | DB connections |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = results[0]["jobs_per_min"]
    for r in results:
        print(
            f"| {r['workers']} | {r['jobs_per_min']:.1f} | {r['jobs_per_min'] / base:.2f}x | "
            f"{r['median_job_s']:.2f} | {r['workers_used']} | {r['failed']} | "
            f"{r['rows_per_job']:.1f} | {r['idle_rows_per_s']:.2f} | {r['connections']} |"
        )
    one = results[0]
    if one["tuned_s"]:
        print(
            f"\nFine-tuning job ({args.fine_tune_steps} steps, 1 worker): {one['tuned_s']:.1f} s, "
            f"{one['tuned_rows']} rows written = {one['tuned_rows'] / one['tuned_s']:.2f} rows/s "
            "of a running job (progress writes, lease renewals, events, results)."
        )
    print(f"Artifacts per prune job (median): {one['artifact_bytes_per_job'] / 1024:.0f} KiB.")


def s3_upload() -> None:
    """A 1 GiB model uploaded to a service on object storage (a moto S3 server on loopback): the
    API receives it to scratch, gates it, then sends it as a multipart upload."""
    from examples.s3server import S3Server

    workdir = Path(tempfile.mkdtemp(prefix="shears-bench-s3-"))
    s3 = S3Server(workdir).start()
    cleanup = ExitStack()
    database, broker = cleanup.enter_context(service_backend("postgres+redis"))
    port = free_port()
    (workdir / "data").mkdir()
    env = service_env(
        workdir / "data",
        port,
        database,
        broker,
        **s3.env(s3.new_bucket()),
        SHEARS_CACHE_DIR=str(workdir / "cache"),
        SHEARS_MAX_UPLOAD_BYTES=str(2 * 1024**3),
        SHEARS_LOG_LEVEL="WARNING",
    )
    svc = Service(data_dir=workdir / "data", env=env, port=port, with_worker=False)
    try:
        svc.start()
        upload = big_upload(svc, workdir)
    finally:
        svc.stop()
        s3.stop()
        cleanup.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n### 1 GiB upload to object storage (moto on loopback), {datetime.now():%Y-%m-%d}\n")
    print("| measure | value |\n| --- | --- |")
    print_upload(upload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--backend", choices=["embedded", "postgres+redis"], default="postgres+redis"
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=15)
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument(
        "--api-workers", type=int, default=1, help="uvicorn processes (compose runs 2)"
    )
    parser.add_argument("--runs", type=int, default=1, help="wrk runs; medians are reported")
    parser.add_argument(
        "--workers",
        type=lambda v: [int(n) for n in v.split(",")],
        default=None,
        help="many-worker run instead: e.g. 1,2,4 worker processes (postgres+redis)",
    )
    parser.add_argument("--settle", type=float, default=12.0, help="s for pg_stat to settle")
    parser.add_argument("--fine-tune-steps", type=int, default=300)
    parser.add_argument(
        "--s3-upload", action="store_true", help="only the 1 GiB upload, to object storage"
    )
    args = parser.parse_args()
    # Stopped with SIGTERM (a background run ignores SIGINT): still stop the services it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.workers:
        many_workers(args)
        return
    if args.s3_upload:
        s3_upload()
        return
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")

    workdir = Path(tempfile.mkdtemp(prefix="shears-bench-"))
    cleanup = ExitStack()
    database, broker = cleanup.enter_context(service_backend(args.backend))
    port = free_port()
    env = service_env(
        workdir / "data",
        port,
        database,
        broker,
        SHEARS_MAX_UPLOAD_BYTES=str(2 * 1024**3),
        SHEARS_LOG_LEVEL="WARNING",
    )
    (workdir / "data").mkdir()
    svc = Service(data_dir=workdir / "data", env=env, port=port, api_workers=args.api_workers)
    # With several processes the API pid is uvicorn's supervisor: its RSS says nothing.
    skip_upload = args.skip_upload or args.api_workers > 1
    try:
        svc.start()
        model = svc.client.post(
            "/v1/models", files={"file": ("r.pt2", export_resnet(workdir / "r.pt2").read_bytes())}
        ).json()
        delays = pick_up(svc, model["id"], args.jobs)
        job_id = svc.client.get("/v1/jobs", params={"limit": 1}).json()["items"][0]["id"]
        poll = status_polls(svc, job_id, args, [])
        upload = None if skip_upload else big_upload(svc, workdir)
    finally:
        svc.stop()
        cleanup.close()
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n### Service on {args.backend}, {args.api_workers} API process(es) "
        f"({torch.__version__}, {datetime.now():%Y-%m-%d})\n"
    )
    print("| measure | value |\n| --- | --- |")
    print_poll("status GET", poll, args)
    print(
        f"| job pick-up (created → started), {len(delays)} jobs | median "
        f"{statistics.median(delays):.0f} ms, min {min(delays):.0f}, max {max(delays):.0f} |"
    )
    if upload:
        print_upload(upload)


if __name__ == "__main__":
    main()
