"""Request and response bodies of the public contract (v1)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from core.pipeline import LayerResult, Metrics
from shears.jobspec import JobSpecRequest

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
    architecture: str | None = Field(
        default=None, description="hf: the transformers class, e.g. LlamaForCausalLM."
    )
    has_tokenizer: bool | None = Field(
        default=None, description="hf: whether the checkpoint carries tokenizer.json."
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="hf: model_type, hidden_size, intermediate_size, num_hidden_layers, "
        "num_attention_heads, num_key_value_heads, head_dim, vocab_size, "
        "max_position_embeddings.",
    )


class ModelList(_Out):
    items: list[ModelOut]
    next_cursor: str | None


class JobCreate(JobSpecRequest):
    """``POST /v1/jobs``: the model, a name, and the spec that is stored with the job."""

    model_id: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=255)

    def spec(self) -> JobSpecRequest:
        """The stored part of the request (everything but ``model_id`` and ``name``)."""
        return JobSpecRequest.model_validate(self.stored())


class ArrayOut(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class DatasetOut(_Out):
    id: str
    name: str
    format: Literal["npz", "safetensors", "text", "jsonl"]
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
    """Scores: classification adds top_k_accuracy and num_samples; regression mse; perplexity
    (language models) perplexity, num_tokens and seq_len."""

    model_config = ConfigDict(extra="allow")
    accuracy: float | None = Field(default=None, description="Top-1 accuracy (classification).")
    loss: float | None = Field(
        default=None,
        description="Cross-entropy (classification), MSE (regression) or mean next-token "
        "negative log-likelihood (perplexity).",
    )


def _model_of(
    source: type,
    name: str,
    doc: str,
    descriptions: dict[str, str],
    *,
    nullable: bool,
    replace: dict[str, Any] | None = None,
) -> type[BaseModel]:
    """A response model with the fields of the dataclass ``source`` (core declares them once):
    each field's type, or ``replace``'s, and its description; ``nullable``: each also null, and
    null when absent."""
    hints = get_type_hints(source)
    missing = set(descriptions) ^ {f.name for f in dataclasses.fields(source)}
    assert not missing, f"{name}: describe exactly the fields of {source.__name__}: {missing}"
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(source):
        annotation = (replace or {}).get(f.name, hints[f.name])
        if nullable:
            fields[f.name] = (annotation | None, Field(None, description=descriptions[f.name]))
        else:
            fields[f.name] = (annotation, Field(description=descriptions[f.name]))
    return create_model(name, __base__=_Out, __doc__=doc, **fields)


_METRICS = {
    "sparsity": "1 - nonzero prunable weights after / prunable weights before.",
    "params_before": "Parameters of the uploaded program.",
    "params_after": "Parameters of the pruned program (fewer only when structure was removed).",
    "nonzero_params_after": "Parameters of the pruned program that are not zero.",
    "macs_before": "Multiply-accumulates per sample (per token for language models), as dense "
    "kernels execute them.",
    "macs_after": "Multiply-accumulates per sample of the pruned program.",
    "size_bytes_before": "Size of the uploaded program file.",
    "size_bytes_after": "Size of the pruned program file; null for a dry run.",
    "sparse_size_bytes_after": "The weights in a sparse encoding (bitmask + nonzeros).",
    "latency_ms_before": "Median latency of one batch of latency_batch_size, before.",
    "latency_ms_after": "Median latency of one batch of latency_batch_size, after; null for a "
    "dry run.",
    "latency_batch_size": "Batch size the latencies were measured at.",
    "device": "Device the latencies were measured on.",
    "eval_before": "Scores of the uploaded program; null without evaluation.",
    "eval_after_pruning": "Scores right after pruning; null without evaluation.",
    "eval_after_fine_tune": "Scores after fine-tuning; null without fine-tuning and evaluation.",
    "tokens_per_second_before": "Language models (hf): greedy decoding at batch 1 with the KV "
    "cache, on the worker's device, before pruning.",
    "tokens_per_second_after": "Language models (hf): the same decoding rate after pruning.",
}
_LAYER = {
    "name": "The layer's module path in the program, e.g. stage1.c1.",
    "kind": "The layer's type, e.g. conv2d or linear.",
    "shape_before": "The weight's shape before pruning.",
    "shape_after": "The weight's shape after pruning (smaller only when structure was removed).",
    "params": "Weights of the layer after pruning.",
    "nonzero": "Weights of the layer after pruning that are not zero.",
    "sparsity": "Fraction of the layer's weights before pruning that are zero or removed.",
}
_EVALS = {name: EvalOut for name in ("eval_before", "eval_after_pruning", "eval_after_fine_tune")}

if TYPE_CHECKING:  # built at import from core's dataclasses; to mypy, plain models
    MetricsOut = _Out
    LayerOut = _Out
else:
    MetricsOut = _model_of(
        Metrics,
        "MetricsOut",
        "Each field is null until it has been measured.",
        _METRICS,
        nullable=True,
        replace=_EVALS,
    )
    LayerOut = _model_of(LayerResult, "LayerOut", LayerResult.__doc__ or "", _LAYER, nullable=False)


class JobErrorOut(BaseModel):
    type: str = Field(description="A stable snake_case code, e.g. invalid_spec, storage_error.")
    message: str


class ArtifactOut(_Out):
    id: str
    kind: Literal["model", "weights", "report", "sensitivity"]
    format: str
    size_bytes: int
    sha256: str
    download_url: str


class SearchOut(BaseModel):
    """A target's search: the scan's progress, the ratios chosen, and what they were predicted
    to give beside what the pruned model measured."""

    model_config = ConfigDict(extra="allow")
    status: Literal["scanning", "scanned", "chosen", "done"] = Field(
        description="scanning; scanned (sensitivity_only: stopped there); chosen; done."
    )
    layers_scanned: int
    layers_total: int
    chosen: dict[str, float] | None = Field(
        default=None, description="Ratio per layer (a channel group by its first layer)."
    )
    predicted: dict[str, float] | None = Field(
        default=None, description="Fractions of the dense macs and params; loss, accuracy."
    )
    achieved: dict[str, Any] | None = Field(
        default=None,
        description="Measured on the pruned model: macs, params, latency fractions, accuracy "
        "and loss after pruning (and after fine-tuning), and whether the target was met.",
    )


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
    queue: str | None = Field(
        default=None, description="The queue its last message went to (CPU or GPU queue)."
    )
    worker: str | None = Field(
        default=None,
        description="The Celery node name of the worker process that ran its last attempt, "
        "e.g. shears-4242@gpu-host-3 (unique per process); null before any attempt.",
    )
    search: SearchOut | None = Field(
        default=None, description="With pruning.target: the search for per-layer ratios."
    )


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


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


class StreamEventOut(EventOut):
    """A job event as one Server-Sent Event's ``data`` (``event:`` its stage, ``id:`` its id)."""

    id: int = Field(description="The event id; send it back as `Last-Event-ID` to resume after it.")


class StreamProgressOut(BaseModel):
    """An ``event: progress`` message: the job's status and progress when they changed. Not stored
    as an event; its ``id:`` is the last event sent, so a resume loses nothing."""

    status: JobStatus
    stage: str
    fraction: float


class ProblemFieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the invalid value is, e.g. body.pruning.")
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error (``application/problem+json``)."""

    type: str = Field(description="A stable slug, e.g. /problems/not-found.")
    title: str
    status: int
    detail: str = Field(description="A sentence a person can act on.")
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="Validation errors (422): every invalid field."
    )
