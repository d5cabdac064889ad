"""A worker process's heartbeat in the database: the queues it consumes, renewed every quarter
lease from a thread of the main process. The API routes GPU work to the GPU queue only while some
GPU worker's row is fresh, so a job never waits on a queue nobody serves."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import structlog

from shears.db import workers
from shears.db.tables import utcnow
from shears.settings import Settings
from worker.db import sessions
from worker.periodic import Periodic

log = structlog.get_logger("shears.presence")

# Rows this many leases old belong to workers long gone: any worker removes them as it beats.
_FORGET_AFTER_LEASES = 20


def node_name() -> str:
    """This process's Celery node name: unique per process, so a job names the one that ran it."""
    return f"shears-{os.getpid()}@{socket.gethostname()}"


class Presence(Periodic):
    def __init__(self, worker: str, queues: list[str], concurrency: int, settings: Settings):
        super().__init__(max(settings.job_lease_seconds / 4, 0.2), name="presence")
        self.worker = worker
        self.queues = queues
        self.concurrency = concurrency
        self.settings = settings

    def beat(self) -> None:
        lease = self.settings.job_lease_seconds
        with sessions().begin() as session:
            workers.announce(
                session,
                self.worker,
                self.queues,
                socket.gethostname(),
                os.getpid(),
                self.concurrency,
            )
            workers.prune(session, utcnow() - timedelta(seconds=lease * _FORGET_AFTER_LEASES))

    def start(self) -> None:
        try:
            self.beat()  # announced before the first job can be routed here
        except Exception:
            log.warning("worker heartbeat failed", exc_info=True)
        super().start()

    def stop(self) -> None:
        super().stop()
        try:
            with sessions().begin() as session:
                workers.forget(session, self.worker)
        except Exception:
            log.warning("could not remove the worker's heartbeat", exc_info=True)
