"""A job's spec as the service takes and stores it: core's :class:`~core.spec.JobSpec` with a
``dataset_id`` in each section that reads a dataset (ids are a service concept; core is handed
files). The request's JSON and the stored JSON are one shape, :class:`JobSpecRequest`, and
:func:`parse_stored` is the one way back to core's spec.

Stored form (``jobs.spec``)::

    {"pruning": {...}, "dry_run": false, "calibration": null,
     "fine_tune": {"dataset_id": "dst_...", "epochs": 3, ...},
     "evaluation": {"dataset_id": "dst_...", ...},
     "mlflow": {"register_as": "..."}}   # only when given; read by the worker, never by core

Rows written before this module had this shape too (core's dump with ``dataset_id`` put back in
each section), so they parse unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.criteria import needs_data
from core.spec import (
    CalibrationSpec,
    EvaluationSpec,
    FineTuneSpec,
    JobSpec,
    SearchSpec,
)
from core.spec import PruningSpec as CorePruningSpec

DatasetId = Field(min_length=1, max_length=64, description="A dataset uploaded to /v1/datasets.")


class CalibrationRequest(CalibrationSpec):
    """``calibration`` of ``POST /v1/jobs``: samples for data-aware criteria."""

    dataset_id: str = DatasetId


class FineTuneRequest(FineTuneSpec):
    """``fine_tune`` of ``POST /v1/jobs``."""

    dataset_id: str = DatasetId


class EvaluationRequest(EvaluationSpec):
    """``evaluation`` of ``POST /v1/jobs``."""

    dataset_id: str = DatasetId


class SearchRequest(SearchSpec):
    """``pruning.search`` of ``POST /v1/jobs``: the data the sensitivity scan scores on."""

    dataset_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="A dataset with targets; default: the evaluation's.",
    )

    @property
    def needs_targets(self) -> bool:
        return True


class PruningSpec(CorePruningSpec):
    """``pruning`` of ``POST /v1/jobs``: core's spec, its ``search`` naming a dataset. (Named as
    core's class, so the published schema keeps its component name ``PruningSpec``.)"""

    search: SearchRequest | None = Field(
        default=None, description="With `target`: the sensitivity scan's data, grid and samples."
    )


DatasetRequest = CalibrationRequest | FineTuneRequest | EvaluationRequest | SearchRequest


class MlflowRequest(BaseModel):
    """``mlflow`` of ``POST /v1/jobs``: what the worker does with the job's MLflow run.

    Only the worker reads it (core never sees it); the run itself is logged whenever the service
    has a tracking server (``SHEARS_MLFLOW_TRACKING_URI``), with or without this section.
    """

    model_config = ConfigDict(extra="forbid")

    register_as: str | None = Field(
        default=None,
        # MLflow accepts almost any name; this keeps it one path-safe token in URLs and UIs.
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="Register the pruned model as a new version of this MLflow registered model.",
    )


class JobSpecRequest(BaseModel):
    """The spec part of ``POST /v1/jobs``, and what ``jobs.spec`` stores."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    pruning: PruningSpec
    dry_run: bool = Field(default=False, description="Report what would be pruned; prune nothing.")
    sensitivity_only: bool = Field(
        default=False,
        description="With `pruning.target`: stop after the sensitivity scan (artifact "
        "`sensitivity`).",
    )
    calibration: CalibrationRequest | None = Field(
        default=None, description="A dataset for data-aware criteria."
    )
    fine_tune: FineTuneRequest | None = Field(
        default=None, description="Retrain after pruning, pruned weights held at zero."
    )
    evaluation: EvaluationRequest | None = Field(
        default=None,
        description="Score before pruning, after pruning and after fine-tuning (needs targets).",
    )
    mlflow: MlflowRequest | None = Field(
        default=None,
        # Left out of the stored spec when not given, so rows keep the shape they always had.
        exclude_if=lambda section: section is None,
        description="MLflow options for this job's run (used when the service logs to MLflow).",
    )

    @model_validator(mode="after")
    def _calibration_for_data_aware(self) -> JobSpecRequest:
        # Checked here, not only in JobSpec, so the client gets a 422 with the field's path.
        if needs_data(self.pruning.criterion) and self.calibration is None:
            raise ValueError(
                f"criterion {self.pruning.criterion!r} ranks channels on data; add "
                '"calibration": {"dataset_id": "...", "num_samples": 256}'
            )
        if self.sensitivity_only and self.pruning.target is None:
            raise ValueError("'sensitivity_only' needs 'pruning.target' (a scan to stop after)")
        search = self.pruning.search
        if (
            self.pruning.target is not None
            and self.evaluation is None
            and (search is None or search.dataset_id is None)
        ):
            raise ValueError(
                "a target is searched on data: give pruning.search.dataset_id or an "
                "'evaluation' (whose data the scan then scores on)"
            )
        return self

    def datasets(self) -> dict[str, DatasetRequest]:
        """``{section: request}`` of the sections given (each names a dataset)."""
        search = self.pruning.search
        sections: dict[str, DatasetRequest | None] = {
            "calibration": self.calibration,
            "fine_tune": self.fine_tune,
            "evaluation": self.evaluation,
            "search": search if search is not None and search.dataset_id is not None else None,
        }
        return {name: section for name, section in sections.items() if section is not None}

    def stored(self) -> dict[str, Any]:
        """The JSON ``jobs.spec`` keeps."""
        return self.model_dump(mode="json", include=set(JobSpecRequest.model_fields))

    def to_core(self) -> tuple[JobSpec, dict[str, str]]:
        """Core's spec (the sections without their ids) and ``{section: dataset_id}``."""
        ids = {
            name: section.dataset_id
            for name, section in self.datasets().items()
            if section.dataset_id is not None
        }
        exclude: dict[str, Any] = {name: {"dataset_id"} for name in ids if name != "search"}
        if self.pruning.search is not None:
            exclude["pruning"] = {"search": {"dataset_id"}}
        # Core's sections only: the service's own (mlflow) stay with the service.
        plain = self.model_dump(include=set(JobSpec.model_fields), exclude=exclude)
        return JobSpec.model_validate(plain), ids


def parse_stored(data: dict[str, Any]) -> tuple[JobSpec, dict[str, str]]:
    """The core spec and ``{section: dataset_id}`` of a stored (or requested) spec.

    A stored row keeps the meaning it had when stored: every field it was stored with is in it,
    and a field added since gets the value that reproduces the behaviour of that time
    (``_ADDED_SINCE``), not today's default."""
    data = dict(data)
    for section, field, then in _ADDED_SINCE:
        stored = data.get(section)
        if isinstance(stored, dict) and field not in stored:
            data[section] = {**stored, field: then}
    return JobSpecRequest.model_validate(data).to_core()


# (section, field, value that means what rows stored before the field existed meant)
_ADDED_SINCE: tuple[tuple[str, str, Any], ...] = (
    # Issue 12: BatchNorm statistics re-estimated after pruning; earlier jobs did not.
    ("fine_tune", "batchnorm_samples", 0),
)
