"""A job's figures from what it stored: scan cells, layer rows, metrics. 404 where not measured."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from api.services import jobs
from api.services.errors import NotFound, ServiceError
from core.search.plots import PlotData, accuracy_data, layer_sparsity_data, sensitivity_data
from shears.db import repository as repo
from shears.db import scans
from shears.db.tables import Job


class NotMeasured(NotFound):
    """The job has no numbers for this figure (yet)."""

    def __init__(self, name: str, why: str) -> None:
        ServiceError.__init__(self, f"The job has no {name} plot: {why}.")
        self.what = "plot"
        self.id = name


def _sensitivity(session: Session, job: Job) -> PlotData:
    baseline = (job.search or {}).get("baseline")
    curves: dict[str, dict[float, dict[str, float]]] = {}
    for cell in scans.cells(session, job.id):
        if cell.status == "done" and cell.scores:
            curves.setdefault(cell.unit, {})[cell.ratio] = cell.scores
    if not baseline or not curves:
        raise NotMeasured("sensitivity", "no sensitivity scan has scored a cell")
    return sensitivity_data(curves, baseline)


def _layer_sparsity(session: Session, job: Job) -> PlotData:
    layers = [(row.name, row.sparsity) for row in repo.job_layers(session, job.id)]
    if not layers:
        raise NotMeasured("layer_sparsity", "the job has not recorded its layers")
    return layer_sparsity_data(layers, (job.search or {}).get("chosen"))


def _accuracy(session: Session, job: Job) -> PlotData:
    metrics = job.metrics or {}
    data = accuracy_data(
        [
            ("before", metrics.get("eval_before")),
            ("after pruning", metrics.get("eval_after_pruning")),
            ("after fine-tune", metrics.get("eval_after_fine_tune")),
        ]
    )
    if data is None:
        raise NotMeasured("accuracy", "the job was not evaluated")
    return data


PLOTS: dict[str, Callable[[Session, Job], PlotData]] = {
    "sensitivity": _sensitivity,
    "layer_sparsity": _layer_sparsity,
    "accuracy": _accuracy,
}


def plot_data(session: Session, tenant: str, job_id: str, name: str) -> PlotData:
    """The data of figure ``name`` of the tenant's job (NotFound: no job, plot or numbers)."""
    job = jobs.get(session, tenant, job_id)
    make = PLOTS.get(name)
    if make is None:
        raise NotMeasured(name, f"plots are {', '.join(PLOTS)}")
    return make(session, job)
