"""Service benchmarks: status-poll throughput and latency (wrk), job pick-up latency, and a
1 GiB upload's throughput and the API process's memory growth.

    apt-get install -y wrk          # the load tool (Debian package)
    .venv/bin/python bench/service.py --backend postgres+redis
    .venv/bin/python bench/service.py --backend embedded
    .venv/bin/python bench/service.py --api-workers 2 --runs 3 --skip-upload   # as compose runs it

On a shared machine, serialise timing runs: ``flock /tmp/shears-bench.lock .venv/bin/python ...``.

Starts the real processes (uvicorn, a Celery worker, the sweeper) exactly as the e2e tests do.
Results are printed as markdown; copy them to docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.models import export_resnet  # noqa: E402
from examples.processes import (  # noqa: E402
    PG_ADMIN_URL,
    REDIS_URL,
    Service,
    free_port,
    private_database,
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
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")

    workdir = Path(tempfile.mkdtemp(prefix="shears-bench-"))
    database_gen = None
    database = broker = None
    if args.backend == "postgres+redis":
        database_gen = private_database(PG_ADMIN_URL)
        database, broker = next(database_gen), REDIS_URL
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
        if database_gen is not None:
            next(database_gen, None)
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
        print(
            f"| 1 GiB upload ({upload['bytes']} B, HTTP {upload['status']}) | "
            f"{upload['seconds']:.1f} s, {upload['mib_per_s']:.0f} MiB/s |"
        )
        print(
            f"| API RSS before / peak growth during upload | {upload['rss_before_mib']:.0f} MiB"
            f" / {upload['growth_mib']:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
