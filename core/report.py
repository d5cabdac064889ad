"""What a job tells its user: the metrics of the contract and the JSON report artifact."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.formats.base import Measurement
from core.pruning.base import LayerResult, PruneOutcome
from core.recovery import Recovered
from core.sparse_verdict import SparseVerdict
from core.spec import SPEC_VERSION, JobSpec


@dataclass(frozen=True)
class Metrics:
    """What changed, in the units of the public contract."""

    sparsity: float
    params_before: int
    params_after: int
    nonzero_params_after: int
    macs_before: int
    macs_after: int
    size_bytes_before: int
    size_bytes_after: int | None
    sparse_size_bytes_after: int
    latency_ms_before: float
    latency_ms_after: float | None
    latency_batch_size: int
    device: str
    eval_before: dict[str, float] | None = None
    eval_after_pruning: dict[str, float] | None = None
    eval_after_fine_tune: dict[str, float] | None = None
    tokens_per_second_before: float | None = None
    tokens_per_second_after: float | None = None


@dataclass(frozen=True)
class Measured:
    """One side of the comparison: the model's cost, its parameters and its file size."""

    cost: Measurement
    params: int
    size_bytes: int | None


def build_metrics(
    *,
    outcome: PruneOutcome,
    prunable_before: int,
    before: Measured,
    after: Measured | None,
    eval_before: dict[str, float] | None,
    recovered: Recovered,
) -> Metrics:
    """The contract's metrics; the "after" figures are those of the exported artifact (a dry run
    exports nothing, so its MACs are the unchanged ones and its latency and size are unknown)."""
    nonzero = sum(layer.nonzero for layer in outcome.layers)
    return Metrics(
        sparsity=1.0 - nonzero / max(prunable_before, 1),
        params_before=before.params,
        params_after=outcome.params_after,
        nonzero_params_after=outcome.nonzero_params_after,
        macs_before=before.cost.macs,
        macs_after=after.cost.macs if after else before.cost.macs,
        size_bytes_before=before.size_bytes or 0,
        size_bytes_after=after.size_bytes if after else None,
        sparse_size_bytes_after=outcome.sparse_size_bytes,
        latency_ms_before=before.cost.latency_ms,
        latency_ms_after=after.cost.latency_ms if after else None,
        latency_batch_size=before.cost.batch_size,
        device=before.cost.device,
        eval_before=eval_before,
        eval_after_pruning=recovered.eval_after_pruning,
        eval_after_fine_tune=recovered.eval_after_fine_tune,
        tokens_per_second_before=before.cost.tokens_per_second,
        tokens_per_second_after=after.cost.tokens_per_second if after else None,
    )


def write_report(
    path: Path,
    spec: JobSpec,
    metrics: Metrics,
    outcome: PruneOutcome,
    recovered: Recovered,
    verdict: SparseVerdict | None = None,
) -> Path:
    """The ``report`` artifact: spec, metrics, per-layer result with kept channel indices, the
    pruner's own details (channel groups), what fine-tuning did and, for weights zeroed in
    place, what the sparsity buys on the device (``sparse_storage``)."""
    report: dict[str, Any] = {
        "spec_version": SPEC_VERSION,
        "spec": spec.model_dump(mode="json"),
        "dry_run": spec.dry_run,
        "metrics": asdict(metrics),
        "excluded_layers": list(outcome.excluded),
        "layers": [_layer_entry(layer, outcome) for layer in outcome.layers],
        **outcome.details,
    }
    if verdict is not None:
        report["sparse_storage"] = verdict.as_dict()
    fine_tune = recovered.fine_tune_report()
    if fine_tune is not None:
        report["fine_tune"] = fine_tune
    path.write_text(json.dumps(report, indent=2))
    return path


def _layer_entry(layer: LayerResult, outcome: PruneOutcome) -> dict[str, Any]:
    # None: every channel kept (always so for weight pruning).
    return {
        **asdict(layer),
        "kept_channels": outcome.kept_out.get(layer.name),
        "kept_input_channels": outcome.kept_in.get(layer.name),
    }
