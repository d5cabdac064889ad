"""``/v1/models``: upload, read, list and delete programs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.schemas import ModelList, ModelOut
from api.services import uploads
from api.uploads import receive_and_validate
from shears.db.tables import Model

router = APIRouter(prefix="/v1/models", tags=["models"])

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
                            "description": "A torch.export program (.pt2, torch.export.save).",
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
    response_model=ModelOut,
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a torch.export program",
    responses={413: {}, 415: {}, 422: {}},
)
async def upload_model(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> Model:
    """Streamed to storage and hashed; the format is read from the content, and the archive is
    validated from its metadata alone: no weight is deserialized."""
    upload, info, name, temp = await receive_and_validate(
        request, storage, settings.max_upload_bytes, uploads.gate_model, "model"
    )
    model = uploads.add_model(session, tenant, name, info, upload)
    async with uploads.stored(storage, temp, model.storage_key):
        session.commit()
    return model


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> Model:
    return uploads.get_model(session, tenant, model_id)


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    items, next_cursor = uploads.list_models(session, tenant, limit, cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.delete("/{model_id}", status_code=204, responses={409: {}})
def delete_model(
    model_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    key = uploads.delete_model(session, tenant, model_id)
    session.commit()
    storage.delete(key)  # after the commit: a failed one leaves the file in place
    return Response(status_code=204)
