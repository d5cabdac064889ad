"""The job event stream: how long an event takes from its commit to a follower, and what open
streams cost the status poll.

    apt-get install -y wrk
    flock /tmp/shears-bench.lock .venv/bin/python bench/sse.py --backend postgres+redis

Starts the real API and sweeper (no worker: the job stays queued, so its streams stay open) as
the e2e tests do. A writer commits events to the job at ``--rate`` per second, as the worker's
lifecycle does (``repository.add_event``, one transaction each), and records each commit's
time; ``--streams`` followers (one asyncio loop, httpx-sse) record when each event reaches them.
Latency = received - committed, over every (event, follower) pair. Then wrk polls the job's
status as bench/service.py does, with no stream open and with the followers open.
Results are printed as markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import status_poll  # noqa: E402
from examples.models import export_resnet  # noqa: E402
from examples.processes import (  # noqa: E402
    Service,
    free_port,
    service_backend,
    service_env,
)
from shears.db.engine import make_engine, make_sessionmaker  # noqa: E402
from shears.db.tables import JobEvent, utcnow  # noqa: E402


def write_events(database_url: str, job_id: str, count: int, rate: float) -> dict[int, float]:
    """Commit ``count`` events at ``rate`` per second; {event id: commit time}."""
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    committed: dict[int, float] = {}
    try:
        for i in range(count):
            # One transaction per event, as the worker's progress callback writes them.
            with sessions.begin() as session:
                event = JobEvent(
                    job_id=job_id, stage="pruning", message=f"bench {i}", data={"i": i}, at=utcnow()
                )
                session.add(event)
                session.flush()
                event_id = event.id
            committed[event_id] = time.time()
            time.sleep(1 / rate)
    finally:
        engine.dispose()
    return committed


async def follow(base_url: str, job_id: str, after: str, count: int, out: list) -> None:
    """One follower: (event id, receive time) of ``count`` events after ``after``."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        headers = {"Last-Event-ID": after}
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as s:
            seen = 0
            async for event in s.aiter_sse():
                if event.data and event.event != "progress":
                    out.append((int(event.id), time.time()))
                    seen += 1
                    if seen == count:
                        return


def measure_latency(svc: Service, job_id: str, streams: int, count: int, rate: float) -> dict:
    after = str(last_event_id(svc.database_url, job_id))
    received: list[tuple[int, float]] = []
    committed: dict[int, float] = {}
    base_url = f"http://127.0.0.1:{svc.port}"

    async def run() -> None:
        followers = [follow(base_url, job_id, after, count, received) for _ in range(streams)]
        tasks = [asyncio.create_task(f) for f in followers]
        await asyncio.sleep(2)  # every follower connected and polling before the first event

        def writer() -> None:
            committed.update(write_events(svc.database_url, job_id, count, rate))

        thread = threading.Thread(target=writer)
        thread.start()
        await asyncio.gather(*tasks)
        thread.join()

    asyncio.run(run())
    latencies = sorted((at - committed[event_id]) * 1000 for event_id, at in received)
    return {
        "samples": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
        "max_ms": latencies[-1],
    }


def last_event_id(database_url: str, job_id: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            stmt = select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id)
            return int(connection.scalar(stmt) or 0)
    finally:
        engine.dispose()


def open_streams(base_url: str, job_id: str, count: int) -> tuple[threading.Thread, list]:
    """``count`` followers held open in a background loop until ``stop`` is set."""
    stop: list[asyncio.Event] = []
    ready = threading.Event()

    async def hold() -> None:
        stop.append(asyncio.Event())
        unbounded = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=unbounded) as client:

            async def one() -> None:
                async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as s:
                    async for _ in s.aiter_sse():
                        if stop[0].is_set():
                            return

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.sleep(2)
            ready.set()
            await stop[0].wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(hold(),), daemon=True)
    thread.start()
    ready.wait(60)
    return thread, [loop, stop]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--backend", choices=["embedded", "postgres+redis"], default="postgres+redis"
    )
    parser.add_argument("--streams", type=int, default=100, help="followers of one job")
    parser.add_argument("--events", type=int, default=100, help="events written")
    parser.add_argument("--rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--poll", type=float, default=0.5, help="SHEARS_EVENTS_POLL_SECONDS")
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")

    workdir = Path(tempfile.mkdtemp(prefix="shears-bench-sse-"))
    cleanup = ExitStack()
    database, broker = cleanup.enter_context(service_backend(args.backend))
    port = free_port()
    env = service_env(
        workdir / "data",
        port,
        database,
        broker,
        SHEARS_LOG_LEVEL="WARNING",
        SHEARS_EVENTS_POLL_SECONDS=str(args.poll),
    )
    (workdir / "data").mkdir()
    svc = Service(data_dir=workdir / "data", env=env, port=port, with_worker=False)
    results: dict[str, dict] = {}
    try:
        svc.start()
        model = svc.client.post(
            "/v1/models", files={"file": ("r.pt2", export_resnet(workdir / "r.pt2").read_bytes())}
        ).json()
        body = {
            "model_id": model["id"],
            "pruning": {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5},
        }
        job_id = svc.client.post("/v1/jobs", json=body).json()["id"]  # stays queued
        results["1 follower"] = measure_latency(svc, job_id, 1, args.events, args.rate)
        results[f"{args.streams} followers"] = measure_latency(
            svc, job_id, args.streams, args.events, args.rate
        )
        base = status_poll(svc, job_id, args.seconds, args.connections, args.threads, [])
        thread, (loop, stop) = open_streams(f"http://127.0.0.1:{port}", job_id, args.streams)
        busy = status_poll(svc, job_id, args.seconds, args.connections, args.threads, [])
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)
    finally:
        svc.stop()
        cleanup.close()
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n### Event stream on {args.backend}, 1 API process, poll {args.poll} s "
        f"({datetime.now():%Y-%m-%d})\n"
    )
    print("| measure | value |\n| --- | --- |")
    for name, r in results.items():
        print(
            f"| event committed → received, {name} ({r['samples']} samples, {args.rate:g} "
            f"events/s) | median {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
            f"max {r['max_ms']:.0f} ms |"
        )
    for name, poll in (("no stream open", base), (f"{args.streams} streams open", busy)):
        print(
            f"| status GET, {name} (wrk -t{args.threads} -c{args.connections} "
            f"-d{args.seconds}s) | {poll['rps']:.0f} req/s, p50 {poll['p50_ms']:.1f} ms, "
            f"p99 {poll['p99_ms']:.1f} ms ({poll['non_2xx']} non-2xx) |"
        )


if __name__ == "__main__":
    main()
