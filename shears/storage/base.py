"""What every storage backend offers, and the registry that picks one from ``SHEARS_STORAGE_URL``.

A key is a relative POSIX path (``models/acme/mdl_x.pt2``). Every write is complete-or-absent: a
reader sees the whole object under its key, or no object at all. Readers that need a file (core
takes paths) get one through :meth:`Storage.materialize`; the API streams ranges or, where the
backend can, hands out a local path or a presigned URL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from shears.settings import Settings

CHUNK = 1024 * 1024


class StorageError(Exception):
    """Storage could not be written or read (disk full, permissions, missing file, S3 error)."""


class StorageQuotaExceeded(StorageError):
    """Keeping the file would take storage past ``SHEARS_STORAGE_QUOTA_BYTES``."""


@dataclass(frozen=True)
class StoredFile:
    key: str
    size_bytes: int
    sha256: str


def check_key(key: str) -> PurePosixPath:
    """The key as a path, refused when it could leave the storage root."""
    rel = PurePosixPath(key)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise StorageError(f"invalid storage key {key!r}")
    return rel


def file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise StorageError(f"could not read {path.name}: {exc.strerror or exc}") from exc
    return size, digest.hexdigest()


def quota_check(quota_bytes: int | None, used: Callable[[], int], incoming: int, key: str) -> None:
    # A soft quota: two commits racing may both pass; it bounds growth, not exact bytes.
    if quota_bytes is None:
        return
    in_use = used()
    if in_use + incoming > quota_bytes:
        raise StorageQuotaExceeded(
            f"storing {key} ({incoming} bytes) would exceed the storage quota of "
            f"{quota_bytes} bytes ({in_use} in use); delete models, datasets or finished "
            "jobs to free space"
        )


@runtime_checkable
class Storage(Protocol):
    """A place for models, datasets, checkpoints and artifacts."""

    quota_bytes: int | None

    def ensure(self) -> None:
        """Create what the backend needs locally (its scratch area)."""

    def healthy(self) -> bool:
        """True when an object can be written and removed."""

    def usage_bytes(self) -> int:
        """Bytes of committed objects (what the quota counts)."""

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh local scratch path (uploads being received, a job's work folder)."""

    def commit(self, temp: Path, key: str) -> None:
        """Store the local file ``temp`` under ``key`` (quota checked); ``temp`` is gone after,
        whether or not it succeeded."""

    def put_file(self, source: Path, key: str) -> StoredFile:
        """Copy ``source`` to ``key``, leaving ``source`` in place."""

    def adopt(self, source: Path, key: str) -> StoredFile:
        """Move ``source`` (a scratch file) to ``key``."""

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def size(self, key: str) -> int | None:
        """The object's size, None when there is none."""

    def materialize(self, key: str, sha256: str, scratch: Path) -> Path:
        """A local file with the object's content, for reading only: the file itself on local
        disk; else a link in the folder ``scratch`` to the read cache's copy (a link, so that
        the cache may evict it while a job still reads it)."""

    def checkout(self, key: str, scratch: Path) -> Path:
        """A local path for a file a job rewrites as it goes (a checkpoint): the stored one when
        there is one. Write there, then :meth:`checkin` it."""

    def checkin(self, path: Path, key: str) -> None:
        """Make the file at a :meth:`checkout` path durable under ``key``."""

    def local_path(self, key: str) -> Path | None:
        """The object as a file on this machine when it is one (local disk), else None."""

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``start..end`` (inclusive) of the object, in chunks."""

    def presigned_url(self, key: str, filename: str) -> str | None:
        """A time-limited URL a client can download from directly; None where there is none."""


StorageFactory = Callable[[Settings, str], Storage]
_BACKENDS: dict[str, StorageFactory] = {}


def register(scheme: str) -> Callable[[StorageFactory], StorageFactory]:
    """Register the factory of the backend for URLs of ``scheme`` (``file``, ``s3``)."""

    def add(factory: StorageFactory) -> StorageFactory:
        _BACKENDS[scheme] = factory
        return factory

    return add


def storage_url(settings: Settings) -> str:
    return settings.storage_url or settings.resolved_storage_dir.as_uri()


def storage_from_settings(settings: Settings) -> Storage:
    """The backend ``SHEARS_STORAGE_URL`` names (default: local disk under the data dir)."""
    url = storage_url(settings)
    scheme = urlsplit(url).scheme
    factory = _BACKENDS.get(scheme)
    if factory is None:
        known = ", ".join(sorted(_BACKENDS))
        raise StorageError(f"SHEARS_STORAGE_URL {url!r}: no storage for {scheme!r} ({known})")
    return factory(settings, url)
