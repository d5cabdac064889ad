"""Prometheus ``/metrics``: request latency, jobs by state, job duration, queue depth.

Job figures are read from the database at scrape time, so they are right whichever process (API,
worker, another replica) changed the jobs; no label carries a job id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class _LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it adds no task or stream copy to each request."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The template (/v1/jobs/{job_id}), never the raw path: ids must not become labels.
            template = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
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

    app.add_middleware(_LatencyMiddleware, histogram=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
