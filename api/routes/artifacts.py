"""``/v1/artifacts``: stream what jobs produced (Range, ETag)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SessionDep, StorageDep, TenantDep
from api.services import jobs

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_MEDIA_TYPES = {
    "pt2": "application/zip",
    "safetensors": "application/octet-stream",
    "json": "application/json",
}


@router.get("/{artifact_id}/download", response_class=FileResponse, responses={206: {}, 416: {}})
def download(
    artifact_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> FileResponse:
    artifact, path = jobs.artifact_file(session, storage, tenant, artifact_id)
    return FileResponse(
        path,
        media_type=_MEDIA_TYPES.get(artifact.format, "application/octet-stream"),
        filename=f"{artifact.job_id}-{artifact.kind}.{artifact.format}",
        headers={"ETag": f'"{artifact.sha256}"'},
    )
