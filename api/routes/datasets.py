"""``/v1/datasets``: upload, read, list and delete datasets for fine-tuning, evaluation and
calibration."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import Problem, not_found
from api.schemas import DatasetList, DatasetOut
from api.uploads import delete_stored, receive_and_validate, store_with_row
from core.data import inspect_dataset
from shears.db import repository as repo
from shears.db.tables import Dataset, new_id, utcnow

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": (
                                ".npz (numpy.savez) or .safetensors holding 'inputs' (or "
                                "'inputs.0', 'inputs.1', ...) and optionally 'targets'; the "
                                "first axis of every array is the samples."
                            ),
                        },
                        "name": {"type": "string", "maxLength": 255},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a dataset",
    responses={413: {}, 415: {}, 422: {}},
)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> Dataset:
    """Streamed to storage and hashed; the format is read from the content, and every array is
    checked (numeric, finite, one sample count) without unpickling anything."""
    upload, info, name, temp = await receive_and_validate(
        request, storage, settings.max_upload_bytes, inspect_dataset, "dataset"
    )
    dataset_id = new_id("dst")
    key = f"datasets/{tenant}/{dataset_id}.{info.format}"
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
        storage_key=key,
        created_at=utcnow(),
    )
    store_with_row(session, storage, temp, key, dataset)
    return dataset


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    dataset = repo.get_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    items, next_cursor = repo.list_datasets(session, tenant, limit, cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.delete("/{dataset_id}", status_code=204, responses={409: {}})
def delete_dataset(
    dataset_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    dataset = repo.get_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    if repo.dataset_in_use(session, tenant, dataset_id):
        raise Problem(
            409,
            "dataset-in-use",
            "Dataset in use",
            "A queued or running job uses this dataset; cancel it or wait for it to finish.",
        )
    delete_stored(session, storage, dataset)
    return Response(status_code=204)
