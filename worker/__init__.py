"""The Celery worker: runs prune jobs from the queue through ``core.pipeline``."""
