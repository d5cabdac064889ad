"""Objects in an S3-compatible bucket (AWS S3, MinIO, moto, Ceph...), under an optional prefix.

``SHEARS_STORAGE_URL=s3://bucket/prefix``; ``SHEARS_S3_ENDPOINT_URL`` for a server other than
AWS; credentials the usual boto3 way (environment, profile, instance role). Writes are
complete-or-absent: boto3 sends a large file as a multipart upload, which S3 makes visible only
when it is completed and aborts when a part fails; a small one is a single PUT, atomic by itself.
Local files (an upload being received, a job's work folder, the read cache) live under
``SHEARS_CACHE_DIR``, never under ``SHEARS_DATA_DIR``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
from shears.storage.cache import ReadCache

_T = TypeVar("_T")
# Parts of 8 MiB, two in flight: an upload holds about 16 MiB of buffers whatever its size.
_PART_BYTES = 8 * 1024 * 1024
_PARTS_IN_FLIGHT = 2


class S3Storage:
    """Keys map to ``<prefix>/<key>`` in ``bucket``."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        scratch: Path,
        cache: ReadCache,
        quota_bytes: int | None = None,
        presign_seconds: int | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.scratch = scratch
        self.cache = cache
        self.quota_bytes = quota_bytes
        self.presign_seconds = presign_seconds
        self._client: Any = None
        self._pid: int | None = None

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        # boto3 clients hold connection pools that must not cross a fork: one per process.
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}),
            )
            self._pid = os.getpid()
        return self._client

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=_PART_BYTES,
            multipart_chunksize=_PART_BYTES,
            max_concurrency=_PARTS_IN_FLIGHT,
        )

    def object_key(self, key: str) -> str:
        rel = check_key(key).as_posix()
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
            raise StorageError(f"could not {what}: {exc}") from exc

    def _upload(self, path: Path, key: str) -> None:
        self._call(
            f"store {key}",
            lambda: self.client.upload_file(
                str(path), self.bucket, self.object_key(key), Config=self._transfer()
            ),
        )

    def _download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            f"read {key}",
            lambda: self.client.download_file(
                self.bucket, self.object_key(key), str(dest), Config=self._transfer()
            ),
        )

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "list objects", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        )
        for page in pages:
            yield from page.get("Contents", [])

    # -- the Storage protocol ---------------------------------------------------------------------
    def ensure(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)

    def healthy(self) -> bool:
        try:
            self._call("reach the bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except StorageError:
            return False
        return True

    def usage_bytes(self) -> int:
        # A listing per quota check: fine for a soft quota at upload rates; a bucket with
        # millions of objects wants an external quota (bucket metrics) instead.
        root = f"{self.prefix}/" if self.prefix else ""
        return sum(int(obj["Size"]) for obj in self._objects(root))

    def temp_path(self, suffix: str = "") -> Path:
        self.ensure()
        return self.scratch / f"{uuid.uuid4().hex}{suffix}"

    def commit(self, temp: Path, key: str) -> None:
        try:
            quota_check(self.quota_bytes, self.usage_bytes, temp.stat().st_size, key)
            self._upload(temp, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def put_file(self, source: Path, key: str) -> StoredFile:
        size, sha256 = file_digest(source)
        quota_check(self.quota_bytes, self.usage_bytes, size, key)
        self._upload(source, key)
        return StoredFile(key=key, size_bytes=size, sha256=sha256)

    def adopt(self, source: Path, key: str) -> StoredFile:
        size, sha256 = file_digest(source)
        self.commit(source, key)
        return StoredFile(key=key, size_bytes=size, sha256=sha256)

    def delete(self, key: str) -> None:
        self._call(
            f"delete {key}",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key)),
        )

    def delete_prefix(self, prefix: str) -> None:
        keys = [{"Key": obj["Key"]} for obj in self._objects(self.object_key(prefix) + "/")]
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects takes
            batch = keys[start : start + 1000]
            self._call(
                f"delete {prefix}",
                lambda batch=batch: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"could not read {key}: {exc}") from exc
        return int(head["ContentLength"])

    def materialize(self, key: str, sha256: str, scratch: Path) -> Path:
        entry = self.cache.get(sha256, lambda dest: self._download(key, dest))
        return self.cache.link_into(entry, scratch, PurePosixPath(key).name)

    def checkout(self, key: str, scratch: Path) -> Path:
        dest = scratch / "checkpoints" / PurePosixPath(key).name
        if self.size(key) is not None:
            self._download(key, dest)
        return dest

    def checkin(self, path: Path, key: str) -> None:
        # The trainer replaces the file by rename at each save; a link pins one version for the
        # whole multipart upload (each part re-opens the file).
        if not path.exists():
            return
        snapshot = path.with_name(f".{path.name}.{uuid.uuid4().hex}.upload")
        try:
            os.link(path, snapshot)
        except FileNotFoundError:
            return
        try:
            self._upload(snapshot, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                snapshot.unlink()

    def local_path(self, key: str) -> Path | None:
        return None

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        response = self._call(
            f"read {key}",
            lambda: self.client.get_object(
                Bucket=self.bucket, Key=self.object_key(key), Range=f"bytes={start}-{end}"
            ),
        )
        body = response["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def presigned_url(self, key: str, filename: str) -> str | None:
        if self.presign_seconds is None:
            return None
        url: str = self._call(
            f"sign {key}",
            lambda: self.client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self.object_key(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                },
                ExpiresIn=self.presign_seconds,
            ),
        )
        return url


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


@register("s3")
def _from_settings(settings: Settings, url: str) -> S3Storage:
    parts = urlsplit(url)
    if not parts.netloc:
        raise StorageError(f"SHEARS_STORAGE_URL {url!r}: expected s3://bucket/prefix")
    cache_dir = settings.resolved_cache_dir
    if _under(cache_dir, settings.data_dir):
        raise StorageError(
            f"SHEARS_CACHE_DIR {cache_dir} lies under SHEARS_DATA_DIR {settings.data_dir}: with "
            "object storage nothing of a model, dataset or artifact may stay in the data dir"
        )
    return S3Storage(
        parts.netloc,
        parts.path,
        endpoint_url=settings.s3_endpoint_url,
        scratch=cache_dir / "scratch",
        cache=ReadCache(cache_dir / "objects", settings.cache_max_bytes),
        quota_bytes=settings.storage_quota_bytes,
        presign_seconds=settings.s3_presign_seconds if settings.s3_presign else None,
    )
