"""The storage backends against real stores: a directory, and a moto S3 server process. Writes
are complete-or-absent (a write that fails midway leaves no object and no temp file), reads of
remote objects go through a bounded, SHA-256-keyed read cache with LRU eviction."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
from pathlib import Path

import httpx
import pytest

from examples.s3server import CREDENTIALS, S3Server
from shears.settings import Settings
from shears.storage import (
    LocalStorage,
    Storage,
    StorageError,
    StorageQuotaExceeded,
    storage_from_settings,
)
from shears.storage.cache import ReadCache
from shears.storage.s3 import S3Storage
from tests.s3 import s3_server

__all__ = ["s3_server"]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def make_s3(server: S3Server, tmp_path: Path, quota: int | None = None) -> S3Storage:
    return S3Storage(
        server.new_bucket(),
        "pre/fix",
        endpoint_url=server.endpoint_url,
        scratch=tmp_path / "scratch",
        cache=ReadCache(tmp_path / "cache", 64 * 1024 * 1024),
        quota_bytes=quota,
        presign_seconds=60,
    )


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    request.getfixturevalue("aws_env")
    return make_s3(request.getfixturevalue("s3_server"), tmp_path)


def write(path: Path, size: int, seed: int = 0) -> bytes:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:size])
    return data[:size]


def read_all(storage: Storage, key: str) -> bytes:
    size = storage.size(key)
    assert size is not None
    return b"".join(storage.read_range(key, 0, size - 1))


def scratch_files(storage: Storage) -> list[Path]:
    folder = storage.temp_path().parent
    return [p for p in folder.rglob("*") if p.is_file() and ".probe" not in p.name]


def test_round_trip_ranges_usage_and_deletes(storage: Storage, tmp_path: Path) -> None:
    data = write(tmp_path / "src.bin", 10 * 1024 * 1024 + 123)  # a multipart upload on S3
    stored = storage.put_file(tmp_path / "src.bin", "models/t/a.pt2")
    assert (stored.size_bytes, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "src.bin").exists()  # put_file copies
    assert read_all(storage, "models/t/a.pt2") == data
    assert b"".join(storage.read_range("models/t/a.pt2", 5, 1000)) == data[5:1001]

    temp = storage.temp_path(".upload")
    small = write(temp, 1000, seed=1)
    storage.commit(temp, "artifacts/t/job/report.json")
    assert not temp.exists()
    assert storage.usage_bytes() == len(data) + len(small)
    storage.adopt(write_temp(storage, 50), "artifacts/t/job/weights.safetensors")

    storage.delete_prefix("artifacts/t/job")
    assert storage.size("artifacts/t/job/report.json") is None
    assert storage.size("artifacts/t/job/weights.safetensors") is None
    storage.delete("models/t/a.pt2")
    assert storage.size("models/t/a.pt2") is None
    assert storage.usage_bytes() == 0
    assert storage.healthy()


def write_temp(storage: Storage, size: int) -> Path:
    temp = storage.temp_path()
    write(temp, size, seed=size)
    return temp


def test_a_key_cannot_leave_the_root(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put_file(write_temp(storage, 10), "../escape")


def test_over_quota_stores_nothing(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("aws_env")
    for storage in (
        LocalStorage(tmp_path / "root", quota_bytes=1500),
        make_s3(request.getfixturevalue("s3_server"), tmp_path, quota=1500),
    ):
        storage.commit(write_temp(storage, 1000), "models/t/one")
        temp = write_temp(storage, 1000)
        with pytest.raises(StorageQuotaExceeded):
            storage.commit(temp, "models/t/two")
        assert storage.size("models/t/two") is None
        assert not temp.exists()
        assert storage.usage_bytes() == 1000


def test_s3_multipart_write_failing_midway_leaves_no_object(
    s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    storage = make_s3(s3_server, tmp_path)
    write(tmp_path / "old", 100)
    storage.put_file(tmp_path / "old", "models/t/m.pt2")
    temp = storage.temp_path(".upload")
    write(temp, 20 * 1024 * 1024)  # three parts of 8 MiB

    def drop_part_two(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        if "partNumber=2" in request.url:
            raise OSError("connection reset while sending part 2")

    storage.client.meta.events.register("before-send.s3.UploadPart", drop_part_two)
    with pytest.raises(StorageError, match="part 2"):
        storage.commit(temp, "models/t/new.pt2")
    assert storage.size("models/t/new.pt2") is None
    # The multipart upload was aborted: no invisible parts left billing in the bucket.
    uploads = s3_server.client().list_multipart_uploads(Bucket=storage.bucket)
    assert uploads.get("Uploads", []) == []
    assert not temp.exists()
    assert storage.size("models/t/m.pt2") == 100  # what was there before is untouched


def test_local_write_failing_midway_leaves_no_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    write(tmp_path / "src.bin", 3 * 1024 * 1024)
    # A file size limit makes the kernel refuse the write past 1 MiB (EFBIG), as a full disk would.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, hard))
    try:
        with pytest.raises(StorageError, match="could not store"):
            storage.put_file(tmp_path / "src.bin", "models/t/m.pt2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert storage.size("models/t/m.pt2") is None
    assert scratch_files(storage) == []


def test_checkpoints_check_out_and_in(storage: Storage, tmp_path: Path) -> None:
    key = "checkpoints/t/job/fine_tune.pt"
    path = storage.checkout(key, tmp_path / "work")
    assert not path.exists()
    write(path, 2000, seed=7)
    storage.checkin(path, key)
    again = storage.checkout(key, tmp_path / "work2")
    assert again.read_bytes() == path.read_bytes()


def test_s3_reads_go_through_the_cache_by_digest(
    s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    storage = make_s3(s3_server, tmp_path)
    data = write(tmp_path / "m.pt2", 5000)
    stored = storage.put_file(tmp_path / "m.pt2", "models/t/m.pt2")
    first = storage.materialize(stored.key, stored.sha256, tmp_path / "job1")
    assert first.read_bytes() == data
    storage.delete(stored.key)  # a hit never asks the store again
    second = storage.materialize(stored.key, stored.sha256, tmp_path / "job2")
    assert second.read_bytes() == data
    assert storage.cache.entry(stored.sha256).exists()
    storage.put_file(tmp_path / "m.pt2", "models/t/other.pt2")
    with pytest.raises(StorageError, match="does not match"):  # content not as recorded
        storage.materialize("models/t/other.pt2", "0" * 64, tmp_path / "job3")
    assert not storage.cache.entry("0" * 64).exists()


def test_presigned_url_serves_the_object(
    s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    storage = make_s3(s3_server, tmp_path)
    data = write(tmp_path / "r.json", 300)
    storage.put_file(tmp_path / "r.json", "artifacts/t/j/report.json")
    url = storage.presigned_url("artifacts/t/j/report.json", "j-report.json")
    assert url is not None
    assert url.startswith(s3_server.endpoint_url)
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert "j-report.json" in response.headers["content-disposition"]


def fill(data: bytes):  # type: ignore[no-untyped-def]
    return lambda dest: dest.write_bytes(data)


def test_cache_evicts_least_recently_used_past_its_bound(tmp_path: Path) -> None:
    cache = ReadCache(tmp_path / "cache", max_bytes=3000)
    blobs = {name: name.encode() * 1000 for name in "abcd"}
    digests = {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}
    for age, name in enumerate("abc"):
        entry = cache.get(digests[name], fill(blobs[name]))
        os.utime(entry, (1000 + age, 1000 + age))  # a older than b older than c
    cache.get(digests["a"], fill(b"never called"))  # a hit: a is now the most recent
    cache.get(digests["d"], fill(blobs["d"]))  # 4000 bytes > 3000: the LRU entry goes
    kept = {name for name in "abcd" if cache.entry(digests[name]).exists()}
    assert kept == {"a", "c", "d"}
    assert cache.usage_bytes() == 3000


def test_an_entry_larger_than_the_bound_is_kept_alone(tmp_path: Path) -> None:
    cache = ReadCache(tmp_path / "cache", max_bytes=100)
    small = cache.get(hashlib.sha256(b"x").hexdigest(), fill(b"x"))
    big_data = b"y" * 500
    big = cache.get(hashlib.sha256(big_data).hexdigest(), fill(big_data))
    assert big.exists()
    assert not small.exists()


def test_the_backend_comes_from_the_url_scheme(tmp_path: Path) -> None:
    local = storage_from_settings(Settings(data_dir=tmp_path / "data"))
    assert isinstance(local, LocalStorage)
    remote = storage_from_settings(
        Settings(
            data_dir=tmp_path / "data",
            storage_url="s3://bucket/a/b",
            cache_dir=tmp_path / "cache",
        )
    )
    assert isinstance(remote, S3Storage)
    assert (remote.bucket, remote.prefix) == ("bucket", "a/b")
    assert remote.object_key("models/x") == "a/b/models/x"
    with pytest.raises(StorageError, match="no storage for 'ftp'"):
        storage_from_settings(Settings(storage_url="ftp://host/x"))
    with pytest.raises(StorageError, match="lies under SHEARS_DATA_DIR"):
        storage_from_settings(
            Settings(
                data_dir=tmp_path / "data",
                storage_url="s3://bucket/p",
                cache_dir=tmp_path / "data" / "cache",
            )
        )
