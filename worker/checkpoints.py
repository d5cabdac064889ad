"""Keep a job's fine-tuning checkpoint durable in storage while the trainer rewrites it locally.

Core saves the checkpoint to a local path (an atomic rename each time). On local disk that path
is the stored key itself; with object storage a thread of its own uploads each new version, so a
worker that dies mid-job leaves the last one for whichever worker takes the job over. The upload
runs beside the lease thread, never in it: a slow upload of a large checkpoint must not let the
lease lapse.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from shears.storage import Storage

log = structlog.get_logger("shears.worker")


class CheckpointMirror:
    def __init__(self, storage: Storage, path: Path, key: str, interval_s: float) -> None:
        self.storage = storage
        self.path = path
        self.key = key
        self.interval_s = interval_s
        self.uploads = 0
        self._seen: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)

    def __enter__(self) -> CheckpointMirror:
        self._seen = self._version()  # what checkout brought: already stored
        self._thread.start()  # on local disk checkin is a no-op: the path is the stored file
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _version(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def sync(self) -> bool:
        """Upload the checkpoint if it changed since the last upload; True when it did."""
        version = self._version()
        if version is None or version == self._seen:
            return False
        self.storage.checkin(self.path, self.key)
        self._seen = version
        self.uploads += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception:  # storage blip: the next round uploads the then-newest version
                log.warning("checkpoint upload failed", exc_info=True)
