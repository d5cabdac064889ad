"""Request and response bodies of the public contract (v1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.criteria import needs_data
from core.spec import PruningSpec
from shears.jobspec import CalibrationRequest, EvaluationRequest, FineTuneRequest

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())


class DynamicDimOut(_Out):
    dim: int
    min: int
    max: int | None


class ModelInputOut(_Out):
    name: str
    shape: list[int] = Field(
        description="Example sizes; dynamic dimensions vary (see dynamic_dims)."
    )
    dtype: str
    dynamic_dims: list[DynamicDimOut]


class PrunableLayerOut(_Out):
    name: str
    kind: str
    shape: list[int]
    params: int


class ModelOut(_Out):
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    num_parameters: int
    inputs: list[ModelInputOut]
    prunable_layers: list[PrunableLayerOut]
    source_job_id: str | None = Field(description="The job that produced this model, if any.")
    created_at: datetime


class ModelList(_Out):
    items: list[ModelOut]
    next_cursor: str | None


class JobCreate(BaseModel):
    """``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=255)
    dry_run: bool = Field(default=False, description="Report what would be pruned; prune nothing.")
    pruning: PruningSpec
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

    @model_validator(mode="after")
    def _calibration_for_data_aware(self) -> JobCreate:
        # Checked here, not only in JobSpec, so the client gets a 422 with the field's path.
        if needs_data(self.pruning.criterion) and self.calibration is None:
            raise ValueError(
                f"criterion {self.pruning.criterion!r} ranks channels on data; add "
                '"calibration": {"dataset_id": "...", "num_samples": 256}'
            )
        return self


class ArrayOut(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class DatasetOut(_Out):
    id: str
    name: str
    format: Literal["npz", "safetensors"]
    size_bytes: int
    sha256: str
    num_samples: int
    has_targets: bool
    arrays: list[ArrayOut] = Field(description="Every array: inputs in order, then targets.")
    created_at: datetime


class DatasetList(_Out):
    items: list[DatasetOut]
    next_cursor: str | None


class ProgressOut(_Out):
    stage: str
    fraction: float


class EvalOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    accuracy: float | None = None
    loss: float | None = None


class MetricsOut(BaseModel):
    """Each field is null until it has been measured."""

    sparsity: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    nonzero_params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    size_bytes_before: int | None = None
    size_bytes_after: int | None = None
    sparse_size_bytes_after: int | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    latency_batch_size: int | None = None
    device: str | None = None
    eval_before: EvalOut | None = None
    eval_after_pruning: EvalOut | None = None
    eval_after_fine_tune: EvalOut | None = None


class JobErrorOut(BaseModel):
    type: str = Field(description="A stable snake_case code, e.g. invalid_spec, storage_error.")
    message: str


class ArtifactOut(_Out):
    id: str
    kind: Literal["model", "weights", "report"]
    format: str
    size_bytes: int
    sha256: str
    download_url: str


class JobOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: JobStatus
    model_id: str
    name: str | None
    dry_run: bool
    spec: dict[str, Any]
    spec_version: int
    attempts: int
    progress: ProgressOut
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    metrics: MetricsOut
    error: JobErrorOut | None
    result_model_id: str | None
    artifacts: list[ArtifactOut]


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class LayerOut(_Out):
    name: str
    kind: str
    shape_before: list[int]
    shape_after: list[int]
    params: int
    nonzero: int
    sparsity: float


class LayerList(BaseModel):
    items: list[LayerOut]


class EventOut(_Out):
    at: datetime
    stage: str
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    items: list[EventOut]
    next_cursor: str | None
