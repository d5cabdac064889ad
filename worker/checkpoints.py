"""Keep a job's fine-tuning checkpoint durable in storage while the trainer rewrites it locally.

Core saves the checkpoint to a local path (an atomic rename each time). On local disk that path
is the stored key itself; with object storage a thread of its own uploads each new version, so a
worker that dies mid-job leaves the last one for whichever worker takes the job over. The upload
runs beside the lease thread, never in it: a slow upload of a large checkpoint must not let the
lease lapse.
"""

from __future__ import annotations

from pathlib import Path

from shears.storage import Storage
from worker.periodic import Periodic


class CheckpointMirror(Periodic):
    def __init__(self, storage: Storage, path: Path, key: str, interval_s: float) -> None:
        # A large checkpoint's last upload may take a while: wait for it on exit.
        super().__init__(interval_s, name="checkpoint-mirror", join_timeout=60)
        self.storage = storage
        self.path = path
        self.key = key
        self.interval_s = interval_s
        self.uploads = 0
        self._seen: int | None = None

    def start(self) -> None:
        self._seen = self._version()  # what checkout brought: already stored
        super().start()  # on local disk checkin is a no-op: the path is the stored file

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

    def beat(self) -> None:
        self.sync()  # after a storage blip the next beat uploads the then-newest version
