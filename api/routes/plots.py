"""``/v1/jobs/{id}/plots/{name}.{svg|png}``: figures rendered from the job's stored numbers."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import SessionDep, TenantDep
from api.services import plots
from core.search.plots import FORMATS, render

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/plots/{filename}",
    response_class=Response,
    responses={
        200: {"content": {media: {} for media in FORMATS.values()}},
        404: {"description": "No such job or plot, or not measured."},
    },
)
def get_plot(job_id: str, filename: str, session: SessionDep, tenant: TenantDep) -> Response:
    """``sensitivity``, ``layer_sparsity`` or ``accuracy``, as ``.svg`` or ``.png``."""
    name, _, fmt = filename.rpartition(".")
    if fmt not in FORMATS:
        name, fmt = filename, ""
    data = plots.plot_data(session, tenant, job_id, name)
    if not fmt:
        raise plots.NotMeasured(name, "ask for .svg or .png")
    # A sync route: FastAPI runs it (the queries and the rendering) off the event loop.
    return Response(render(data, fmt), media_type=FORMATS[fmt])
