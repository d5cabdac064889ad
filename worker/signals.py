"""The worker process's own life: announce itself while it runs, pin each pool child to its GPU
before the child touches CUDA, and set the allocator to give large freed blocks back. Connected
when the worker loads its tasks (the API, which imports only ``worker.celery_app``, never runs
these)."""

from __future__ import annotations

from typing import Any

import structlog
from billiard.process import current_process
from celery.signals import (
    celeryd_after_setup,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from core.allocator import set_mmap_threshold
from shears.settings import get_settings
from worker.devices import pin_child
from worker.presence import Presence

log = structlog.get_logger("shears.worker")

# The GPUs the main process saw (set by ``shears worker`` in the Celery config: the children are
# forks, so they read the same config). Empty: no pinning.
GPUS_CONF_KEY = "shears_gpus"

_presence: Presence | None = None
_setup: dict[str, Any] = {}


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _remember(sender: str, instance: Any, **_: Any) -> None:
    # Before any job: the pool's children are forks and inherit it (a solo pool runs jobs here).
    _set_allocator()
    _setup["worker"] = sender
    _setup["queues"] = sorted(instance.app.amqp.queues.consume_from)
    _setup["concurrency"] = int(instance.concurrency or 1)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _announce(**_: Any) -> None:
    global _presence
    if not _setup:
        return
    _presence = Presence(_setup["worker"], _setup["queues"], _setup["concurrency"], get_settings())
    _presence.start()
    log.info("worker ready", worker=_setup["worker"], queues=_setup["queues"])


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _withdraw(**_: Any) -> None:
    if _presence is not None:
        _presence.stop()


def _set_allocator() -> None:
    threshold = get_settings().malloc_mmap_threshold_bytes
    if set_mmap_threshold(threshold):
        log.info("allocator maps large blocks", mmap_threshold_bytes=threshold)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _pin_gpu(sender: Any = None, **_: Any) -> None:
    from worker.celery_app import app

    gpus = list(app.conf.get(GPUS_CONF_KEY) or [])
    index = int(getattr(current_process(), "index", 0) or 0)
    gpu = pin_child(index, gpus)
    if gpu is not None:
        log.info("pool child pinned to its GPU", child=index, gpu=gpu)
