"""The notify worker's Celery app (``celery -A worker.notify_app worker -Q <notify queue>``).

It loads only the notification modules: no job code, no torch, so it starts in a moment and its
threads spend their time waiting on the network. A module here registers its job event listeners
and ``shears.notify.*`` tasks when imported: add a line for a new one.
"""

from __future__ import annotations

from worker.celery_app import create_celery

NOTIFY_MODULES = (
    "worker.notify",
    "worker.webhooks",
    "worker.mlflow_log",
)

app = create_celery(include=NOTIFY_MODULES)
