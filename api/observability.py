"""Prometheus ``/metrics``: request latency, jobs by state, job duration, queue depth.

Job figures are read from the database at scrape time, so they are right whichever process (API,
worker, another replica) changed the jobs; no label carries a job id.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shears.db.tables import Job

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_RECENT_JOBS = 10_000


class JobCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            spans = session.execute(
                select(Job.started_at, Job.finished_at)
                .where(Job.status == "succeeded", Job.started_at.is_not(None))
                .order_by(Job.finished_at.desc())
                .limit(_RECENT_JOBS)
            ).all()
        by_status = GaugeMetricFamily("shears_jobs", "Jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily(
            "shears_queue_depth", "Jobs waiting for a worker.", value=counts.get("queued", 0)
        )
        durations = sorted(
            (finished - started) / timedelta(seconds=1)
            for started, finished in spans
            if finished is not None and started is not None
        )
        buckets = [(str(b), sum(1 for d in durations if d <= b)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        yield HistogramMetricFamily(
            "shears_job_duration_seconds",
            f"Run time of the latest {_RECENT_JOBS} succeeded jobs (claim to success).",
            buckets=buckets,
            sum_value=sum(durations),
        )


def install_metrics(app: FastAPI, sessions: sessionmaker[Session]) -> None:
    registry = CollectorRegistry()
    latency = Histogram(
        "shears_http_request_duration_seconds",
        "API request latency by route template.",
        ["method", "route", "status"],
        registry=registry,
    )
    registry.register(JobCollector(sessions))

    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        # The template (/v1/jobs/{job_id}), never the raw path: ids must not become labels.
        template = getattr(route, "path", "unmatched")
        latency.labels(request.method, template, str(response.status_code)).observe(
            time.perf_counter() - start
        )
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
