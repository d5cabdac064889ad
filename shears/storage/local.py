"""Files on local disk under one root. Everything is written under a temporary name, flushed to
disk, then renamed into place, so a key either names a complete file or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shears.settings import Settings
from shears.storage.base import (
    CHUNK,
    StorageError,
    StoredFile,
    check_key,
    file_digest,
    quota_check,
    register,
)


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

    def ensure(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).parts)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path in the temp area, on the same filesystem as the final keys."""
        self.ensure()
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def commit(self, temp: Path, key: str) -> None:
        """Flush ``temp`` to disk and rename it to ``key`` atomically."""
        target = self.path(key)
        try:
            quota_check(self.quota_bytes, self.usage_bytes, temp.stat().st_size, key)
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

    def put_file(self, source: Path, key: str) -> StoredFile:
        """Copy ``source`` to ``key`` (through a temp file), hashing it on the way."""
        temp = self.temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with source.open("rb") as src, temp.open("wb") as dst:
                while chunk := src.read(CHUNK):
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
        size, sha256 = file_digest(source)
        self.commit(source, key)
        return StoredFile(key=key, size_bytes=size, sha256=sha256)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def materialize(self, key: str, sha256: str, scratch: Path) -> Path:
        # The file is already here: a cache would only copy it.
        return self.path(key)

    def checkout(self, key: str, scratch: Path) -> Path:
        # Core replaces the file atomically at each save, so the key itself is the durable copy.
        return self.path(key)

    def checkin(self, path: Path, key: str) -> None:
        return None

    def local_path(self, key: str) -> Path | None:
        path = self.path(key)
        return path if path.is_file() else None

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with self.path(key).open("rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk

    def presigned_url(self, key: str, filename: str) -> str | None:
        return None

    def healthy(self) -> bool:
        """True when a file can be written and removed under the root."""
        try:
            probe = self.temp_path(".probe")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True


@register("file")
def _from_settings(settings: Settings, url: str) -> LocalStorage:
    # Unset, the URL is the resolved storage dir (SHEARS_STORAGE_DIR or data_dir/storage).
    return LocalStorage(Path(unquote(urlsplit(url).path)), settings.storage_quota_bytes)
