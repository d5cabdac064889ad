"""Models and datasets: the rows of uploaded files, their lookups and their deletion.

The file and its row go together: :func:`stored` puts the file in place around the commit of the
row and takes it away again if that commit fails. Nothing here commits.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services.errors import Conflict, NotFound
from api.uploads import ReceivedUpload
from core.data import DatasetInfo
from core.datasets import inspect_any_dataset
from core.formats import ModelInfo, get_format, inspect_upload
from shears.db import repository as repo
from shears.db.tables import Dataset, Model, StoredFile, new_id, utcnow
from shears.storage import Storage


def gate_model(path: Path) -> ModelInfo:
    """The one place the API gates an uploaded model: format from the content (any registered
    format), metadata only, no weight deserialized (core raises UnsupportedFormat,
    InvalidArchive or UnsafeArchive)."""
    return inspect_upload(path)


def gate_dataset(path: Path) -> DatasetInfo:
    """The one place the API checks an uploaded dataset (core raises InvalidDataset)."""
    return inspect_any_dataset(path)


def add_model(
    session: Session, tenant: str, name: str, info: ModelInfo, upload: ReceivedUpload
) -> Model:
    """Add the row of an uploaded program; its file goes to ``model.storage_key``."""
    model_id = new_id("mdl")
    key = f"models/{tenant}/{model_id}{get_format(info.format).suffix}"
    model = repo.model_row(model_id, tenant, name, info, key, upload.size_bytes, upload.sha256)
    session.add(model)
    return model


def add_dataset(
    session: Session, tenant: str, name: str, info: DatasetInfo, upload: ReceivedUpload
) -> Dataset:
    """Add the row of an uploaded dataset; its file goes to ``dataset.storage_key``."""
    dataset_id = new_id("dst")
    dataset = Dataset(
        id=dataset_id,
        tenant=tenant,
        name=name,
        format=info.format,
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        num_samples=info.num_samples,
        has_targets=info.has_targets,
        arrays=[asdict(a) for a in (*info.inputs, *([info.targets] if info.targets else []))],
        storage_key=f"datasets/{tenant}/{dataset_id}.{info.format}",
        created_at=utcnow(),
    )
    session.add(dataset)
    return dataset


@contextlib.asynccontextmanager
async def stored(storage: Storage, temp: Path, key: str) -> AsyncIterator[None]:
    """Move ``temp`` to ``key`` (quota checked), then run the block, which commits the file's row;
    if the block fails the file is removed: never a file without its row nor a row without its
    file. The transfer (a multipart upload to object storage, a rename on local disk) runs in a
    worker thread, so a 1 GiB model never blocks the event loop."""
    try:
        await run_in_threadpool(storage.commit, temp, key)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    try:
        yield
    except BaseException:
        await run_in_threadpool(storage.delete, key)
        raise


def get_model(session: Session, tenant: str, model_id: str) -> Model:
    model = repo.get_model(session, tenant, model_id)
    if model is None:
        raise NotFound("model", model_id)
    return model


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    dataset = repo.get_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise NotFound("dataset", dataset_id)
    return dataset


def list_models(
    session: Session, tenant: str, limit: int, cursor: str | None
) -> tuple[list[Model], str | None]:
    """Newest first; raises ``repo.InvalidCursor`` for a cursor this service did not hand out."""
    return repo.list_models(session, tenant, limit, cursor)


def list_datasets(
    session: Session, tenant: str, limit: int, cursor: str | None
) -> tuple[list[Dataset], str | None]:
    return repo.list_datasets(session, tenant, limit, cursor)


def delete_model(session: Session, tenant: str, model_id: str) -> str:
    """Mark the model deleted (jobs that used it still resolve its id); returns its storage key,
    for the caller to remove once that is committed."""
    model = get_model(session, tenant, model_id)
    if repo.model_in_use(session, model_id):
        raise Conflict(
            "model-in-use",
            "Model in use",
            "A queued or running job uses this model; cancel it or wait for it to finish.",
        )
    return _mark_deleted(model)


def delete_dataset(session: Session, tenant: str, dataset_id: str) -> str:
    """As :func:`delete_model`, for a dataset no queued or running job names."""
    dataset = get_dataset(session, tenant, dataset_id)
    if repo.dataset_in_use(session, tenant, dataset_id):
        raise Conflict(
            "dataset-in-use",
            "Dataset in use",
            "A queued or running job uses this dataset; cancel it or wait for it to finish.",
        )
    return _mark_deleted(dataset)


def _mark_deleted(row: StoredFile) -> str:
    row.deleted_at = utcnow()
    return row.storage_key
