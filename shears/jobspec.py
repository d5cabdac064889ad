"""A job's spec as the service stores it: core's :class:`~core.spec.JobSpec` plus the ids of the
datasets its sections use (ids are a service concept; core is handed files).

Stored form (``jobs.spec``)::

    {"pruning": {...}, "dry_run": false,
     "fine_tune": {"dataset_id": "dst_...", "epochs": 3, ...},
     "evaluation": {"dataset_id": "dst_...", ...}, "calibration": null}
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, Field

from core.spec import CalibrationSpec, EvaluationSpec, FineTuneSpec, JobSpec
from shears.db.repository import dataset_ids

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


def _section_model(section: str) -> type[BaseModel]:
    """The core model of a JobSpec section (``fine_tune`` -> FineTuneSpec)."""
    annotation = JobSpec.model_fields[section].annotation
    for arg in (*get_args(annotation), annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    raise KeyError(section)


def _core_keeps_id(section: str) -> bool:
    # Robust to a core section that declares its own dataset_id (then it is stored as is).
    return "dataset_id" in _section_model(section).model_fields


def stored_spec(spec: JobSpec, ids: dict[str, str]) -> dict[str, Any]:
    """The JSON to store: ``spec`` with each section's ``dataset_id`` put back in."""
    data = spec.model_dump(mode="json")
    for section, dataset_id in ids.items():
        if not _core_keeps_id(section):
            data[section] = {"dataset_id": dataset_id, **data[section]}
    return data


def parse_stored(data: dict[str, Any]) -> tuple[JobSpec, dict[str, str]]:
    """The core spec and ``{section: dataset_id}`` of a stored spec."""
    ids = dataset_ids(data)
    plain = {
        key: (
            {k: v for k, v in value.items() if k != "dataset_id"}
            if key in ids and isinstance(value, dict) and not _core_keeps_id(key)
            else value
        )
        for key, value in data.items()
    }
    return JobSpec.model_validate(plain), ids


def core_section(section: str, request: BaseModel) -> BaseModel:
    """The core spec of one request section: its fields, without ``dataset_id`` unless the core
    model keeps it."""
    exclude = set() if _core_keeps_id(section) else {"dataset_id"}
    return _section_model(section).model_validate(request.model_dump(exclude=exclude))
