"""Files on local disk under one root. Everything is written under a temporary name, flushed to
disk, then renamed into place, so a key either names a complete file or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shears.settings import Settings

_CHUNK = 1024 * 1024


def storage_from_settings(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.resolved_storage_dir, settings.storage_quota_bytes)


class StorageError(Exception):
    """Storage could not be written or read (disk full, permissions, missing file)."""


class StorageQuotaExceeded(StorageError):
    """Keeping the file would take storage past ``SHEARS_STORAGE_QUOTA_BYTES``."""


@dataclass(frozen=True)
class StoredFile:
    key: str
    size_bytes: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """Keys are relative POSIX paths (``models/mdl_x.pt2``); they never leave ``root``."""

    def __init__(self, root: Path, quota_bytes: int | None = None) -> None:
        self.root = root
        self.tmp_dir = root / ".tmp"
        self.quota_bytes = quota_bytes

    def usage_bytes(self) -> int:
        """Bytes of committed files (the temp area does not count: it is emptied as jobs end)."""
        total = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != ".tmp"]
            for name in filenames:
                with contextlib.suppress(FileNotFoundError):
                    total += (Path(dirpath) / name).stat().st_size
        return total

    def _check_quota(self, incoming: int, key: str) -> None:
        # A soft quota: two commits racing may both pass; it bounds growth, not exact bytes.
        if self.quota_bytes is None:
            return
        used = self.usage_bytes()
        if used + incoming > self.quota_bytes:
            raise StorageQuotaExceeded(
                f"storing {key} ({incoming} bytes) would exceed the storage quota of "
                f"{self.quota_bytes} bytes ({used} in use); delete models, datasets or finished "
                "jobs to free space"
            )

    def ensure(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        rel = PurePosixPath(key)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise StorageError(f"invalid storage key {key!r}")
        return self.root.joinpath(*rel.parts)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path in the temp area, on the same filesystem as the final keys."""
        self.ensure()
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def commit(self, temp: Path, key: str) -> Path:
        """Flush ``temp`` to disk and rename it to ``key`` atomically."""
        target = self.path(key)
        try:
            self._check_quota(temp.stat().st_size, key)
        except StorageError:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with temp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(temp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise StorageError(f"could not store {key}: {exc.strerror or exc}") from exc
        return target

    def put_file(self, source: Path, key: str) -> StoredFile:
        """Copy ``source`` to ``key`` (through a temp file), hashing it on the way."""
        temp = self.temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with source.open("rb") as src, temp.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise StorageError(f"could not store {key}: {exc.strerror or exc}") from exc
        self.commit(temp, key)
        return StoredFile(key=key, size_bytes=size, sha256=digest.hexdigest())

    def adopt(self, source: Path, key: str) -> StoredFile:
        """Move ``source`` (on the storage filesystem, e.g. under the temp area) to ``key``."""
        digest = hashlib.sha256()
        size = 0
        try:
            with source.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise StorageError(f"could not read {source.name}: {exc.strerror or exc}") from exc
        self.commit(source, key)
        return StoredFile(key=key, size_bytes=size, sha256=digest.hexdigest())

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def healthy(self) -> bool:
        """True when a file can be written and removed under the root."""
        try:
            probe = self.temp_path(".probe")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True
