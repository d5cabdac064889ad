"""``/v1/artifacts``: stream what jobs produced (Range, ETag), from local disk or object storage,
or redirect to a presigned URL where the storage hands them out (``SHEARS_S3_PRESIGN``)."""

from __future__ import annotations

from fastapi import APIRouter, Header
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from api.deps import SessionDep, StorageDep, TenantDep
from api.ranges import Unsatisfiable, parse_range
from api.services import jobs

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_MEDIA_TYPES = {
    "pt2": "application/zip",
    "safetensors": "application/octet-stream",
    "json": "application/json",
}


@router.get(
    "/{artifact_id}/download",
    response_class=FileResponse,
    responses={206: {}, 307: {"description": "Fetch the file from this presigned URL."}, 416: {}},
)
def download(
    artifact_id: str,
    session: SessionDep,
    storage: StorageDep,
    tenant: TenantDep,
    range_header: str | None = Header(default=None, alias="Range", include_in_schema=False),
) -> Response:
    artifact, size = jobs.artifact_file(session, storage, tenant, artifact_id)
    filename = f"{artifact.job_id}-{artifact.kind}.{artifact.format}"
    media_type = _MEDIA_TYPES.get(artifact.format, "application/octet-stream")
    headers = {"ETag": f'"{artifact.sha256}"', "Accept-Ranges": "bytes"}
    local = storage.local_path(artifact.storage_key)
    if local is not None:  # Starlette serves a file's ranges itself
        return FileResponse(local, media_type=media_type, filename=filename, headers=headers)
    url = storage.presigned_url(artifact.storage_key, filename)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    try:
        wanted = parse_range(range_header, size)
    except Unsatisfiable:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    body = storage.read_range(artifact.storage_key, start, end) if size else iter(())
    return StreamingResponse(body, status_code=status, media_type=media_type, headers=headers)
