"""``/v1/datasets``: upload, read, list and delete datasets for fine-tuning, evaluation and
calibration."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.schemas import DatasetList, DatasetOut
from api.services import uploads
from api.uploads import receive_and_validate
from shears.db.tables import Dataset

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
        request, storage, settings.max_upload_bytes, uploads.gate_dataset, "dataset"
    )
    dataset = uploads.add_dataset(session, tenant, name, info, upload)
    async with uploads.stored(storage, temp, dataset.storage_key):
        session.commit()
    return dataset


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return uploads.get_dataset(session, tenant, dataset_id)


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    items, next_cursor = uploads.list_datasets(session, tenant, limit, cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.delete("/{dataset_id}", status_code=204, responses={409: {}})
def delete_dataset(
    dataset_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    key = uploads.delete_dataset(session, tenant, dataset_id)
    session.commit()
    storage.delete(key)  # after the commit: a failed one leaves the file in place
    return Response(status_code=204)
