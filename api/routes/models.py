"""``/v1/models``: upload, read, list and delete programs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import Problem, not_found
from api.schemas import ModelList, ModelOut
from api.uploads import delete_stored, receive_and_validate, store_with_row
from core.formats import inspect_upload
from shears.db import repository as repo
from shears.db.tables import Model, new_id

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
        request, storage, settings.max_upload_bytes, inspect_upload, "model"
    )
    model_id = new_id("mdl")
    key = f"models/{tenant}/{model_id}.pt2"
    model = repo.model_row(model_id, tenant, name, info, key, upload.size_bytes, upload.sha256)
    store_with_row(session, storage, temp, key, model)
    return model


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> Model:
    model = repo.get_model(session, tenant, model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    items, next_cursor = repo.list_models(session, tenant, limit, cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.delete("/{model_id}", status_code=204, responses={409: {}})
def delete_model(
    model_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    model = repo.get_model(session, tenant, model_id)
    if model is None:
        raise not_found("model", model_id)
    if repo.model_in_use(session, model_id):
        raise Problem(
            409,
            "model-in-use",
            "Model in use",
            "A queued or running job uses this model; cancel it or wait for it to finish.",
        )
    delete_stored(session, storage, model)
    return Response(status_code=204)
