"""A background thread that calls ``beat`` every ``interval`` seconds: the shape of every renewal
in the worker (a job's lease, a scan cell's lease, the process's presence, checkpoint uploads)."""

from __future__ import annotations

import threading
from typing import Self

import structlog

log = structlog.get_logger("shears.worker")


class Periodic:
    """``with Sub(...):`` (or ``start()``/``stop()``) beats from a daemon thread until stopped.

    A failed beat is logged and the next one retries: a database or storage blip must not kill the
    work it protects (the worst case is a lapsed lease, and another worker takes over).
    """

    def __init__(self, interval: float, name: str, join_timeout: float = 10.0) -> None:
        self.interval = interval
        self.join_timeout = join_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def beat(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.join_timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:
                log.warning("periodic beat failed", thread=self._thread.name, exc_info=True)
