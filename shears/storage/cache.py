"""The worker's read cache: objects fetched from remote storage, kept on local disk by SHA-256
with a size bound and least-recently-used eviction.

Models and datasets never change under their id, so their content hash names them for good: a
hit needs no round trip to the store. The cache lives in ``SHEARS_CACHE_DIR`` (never under
``SHEARS_DATA_DIR``) and may be shared by every worker process on a machine: entries appear by
atomic rename, and an evicted entry that a job has linked into its work folder stays readable
there until the job ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from shears.storage.base import StorageError, file_digest

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ReadCache:
    """Files under ``root/<sha256[:2]>/<sha256>``; at most ``max_bytes`` after each fill."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.max_bytes = max_bytes

    def entry(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise StorageError(f"not a SHA-256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def get(self, sha256: str, fill: Callable[[Path], None]) -> Path:
        """The cached file with this digest; on a miss ``fill(path)`` writes it, and the content
        is checked against the digest before it is kept."""
        entry = self.entry(sha256)
        try:
            os.utime(entry)  # a hit: most recently used now
            return entry
        except FileNotFoundError:
            pass
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        temp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            fill(temp)
            _, actual = file_digest(temp)
            if actual != sha256:
                raise StorageError(
                    f"the stored object's content does not match its recorded SHA-256 "
                    f"({actual} != {sha256})"
                )
            entry.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, entry)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        self.evict(keep=entry)
        return entry

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("??/*") if p.is_file() and _SHA256.match(p.name)]

    def usage_bytes(self) -> int:
        total = 0
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits its bound; ``keep`` (the entry
        just filled) stays even when it alone is larger. Returns what was removed."""
        sized: list[tuple[float, int, Path]] = []
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                sized.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in sized)
        removed = []
        for _, size, path in sorted(sized):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
            total -= size
        return removed

    def link_into(self, entry: Path, folder: Path, name: str) -> Path:
        """A hard link to ``entry`` in ``folder`` (a copy across filesystems)."""
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(entry, target)
        except OSError:
            shutil.copyfile(entry, target)
        return target
