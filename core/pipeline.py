"""The one entry point: load -> measure -> prune -> recover -> export -> report.

Example (no service needed)::

    from core.pipeline import run
    from core.spec import JobSpec, PruningSpec

    spec = JobSpec(pruning=PruningSpec(criterion="l1", granularity="unstructured",
                                       sparsity=0.8, scope="global"))
    result = run(spec, "resnet.pt2", "out/")
    print(result.metrics.sparsity, result.artifacts["model"])   # 0.8, out/model.pt2
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.device import pick_device
from core.formats import MeasureConfig, ModelFormat, ModelInfo, detect
from core.progress import FRACTION, ProgressCallback, Stage, between, no_progress
from core.pruning import (
    LayerResult,
    PruneContext,
    PruneOutcome,
    RoundHook,
    pruner_for,
    run_rounds,
)
from core.pruning import preflight as pruning_preflight
from core.recovery import PipelineData, Recovered, Recovery, TrainingConfig
from core.recovery_lm import LmRecovery
from core.report import Measured, Metrics, build_metrics, write_report
from core.schedule import rounds_of
from core.sparse_verdict import SparseVerdict, measure_sparse_verdict
from core.spec import JobSpec

__all__ = [
    "LayerResult",
    "MeasureConfig",
    "Metrics",
    "PipelineData",
    "PipelineResult",
    "ProgressCallback",
    "Stage",
    "TrainingConfig",
    "check_recovery",
    "preflight",
    "run",
]


class RecoveryStage(Protocol):
    """Evaluation and fine-tuning around the pruning step, for one model format."""

    eval_before: dict[str, float] | None

    @staticmethod
    def check(spec: JobSpec) -> None: ...

    @property
    def calibration(self) -> tuple[Any, ...] | None: ...

    def recover(self, model: Any) -> Recovered: ...

    def round_hook(self, rounds: int) -> RoundHook: ...


# How each format recovers: its datasets, evaluation and fine-tuning. One line per format.
_RECOVERY: dict[str, Any] = {"pt2": Recovery, "hf": LmRecovery}


def preflight(fmt: str, spec: JobSpec, layers: Mapping[str, int]) -> None:
    """What can be checked before a job is queued, from the model's metadata alone: a pruner
    exists for the format and granularity, the pruning fits the prunable layers (name ->
    weights), and the format's recovery accepts the evaluation and fine-tuning asked for.

    Raises:
        InvalidSpec: naming what does not fit.
    """
    pruning_preflight(fmt, spec.pruning, layers)
    check_recovery(fmt, spec)


def check_recovery(fmt: str, spec: JobSpec) -> None:
    """Refuse an evaluation task or fine-tuning loss that models of format ``fmt`` cannot do."""
    _RECOVERY[fmt].check(spec)


@dataclass(frozen=True)
class PipelineResult:
    """The measurements, and the files written: ``report`` always; ``model`` (and the format's
    other artifacts, ``weights`` for ``pt2``) unless a dry run. ``model_info`` describes the
    written model as the format's gate read it back (``None`` for a dry run)."""

    metrics: Metrics
    layers: tuple[LayerResult, ...]
    format: str
    report_path: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    model_info: ModelInfo | None = None

    @property
    def model_path(self) -> Path | None:
        return self.artifacts.get("model")

    @property
    def weights_path(self) -> Path | None:
        return self.artifacts.get("weights")


def run(
    spec: JobSpec,
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    measure: MeasureConfig | None = None,
    on_progress: ProgressCallback | None = None,
    data: PipelineData | None = None,
    training: TrainingConfig | None = None,
    on_round: RoundHook | None = None,
    after_prune: Callable[[Any], None] | None = None,
) -> PipelineResult:
    """Prune the model at ``model_path`` as ``spec`` says and write the artifacts to ``out_dir``.

    The format is recognised from the file (see :mod:`core.formats`), the pruner chosen by
    format and granularity (see :mod:`core.pruning`). With ``spec.evaluation`` the model is
    scored before pruning, after pruning and after fine-tuning; with ``spec.fine_tune`` it is
    retrained with its pruned weights held at zero (both skipped after pruning in a dry run).
    Their datasets come from ``data``; the data-aware criteria read ``data.calibration``. Cost
    (MACs, latency) is measured on ``measure.device``. An iterative schedule calls ``on_round``
    after every round but the last (default: evaluation and a share of the fine-tuning).
    ``after_prune`` is given the pruned model before it is scored (a search re-estimates
    BatchNorm statistics there, as its scan did); not in a dry run.

    Raises:
        core.errors.ShearsError: the file was refused, the spec does not fit this model, or a step
            failed; ``code`` says which. Whatever ``on_progress`` raises propagates unchanged.
    """
    m = measure or MeasureConfig()
    progress = on_progress or no_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    progress("loading", FRACTION["load"], "validating and loading the model")
    fmt = detect(model_path)
    pruner = pruner_for(fmt.name, spec.pruning.granularity)
    model, info = fmt.load(model_path)
    try:
        before = Measured(
            fmt.measure(model, info, m),
            fmt.count_parameters(model),
            Path(model_path).stat().st_size,
        )
        recovery: RecoveryStage = _RECOVERY[fmt.name].prepare(
            spec, model, info, data or PipelineData(), training or TrainingConfig(), progress
        )

        progress("pruning", FRACTION["prune"], f"pruning: {spec.pruning.granularity}")
        rounds_hook = on_round or recovery.round_hook(rounds_of(spec.pruning))
        outcome = run_rounds(
            pruner,
            model,
            info,
            spec.pruning,
            PruneContext(calibration=recovery.calibration, dry_run=spec.dry_run),
            on_round=rounds_hook,
            on_progress=lambda t, n, sparsity: progress(
                "pruning",
                between("prune", "fine_tune", t / n),
                f"round {t} of {n}: sparsity {sparsity:.3f}",
                {"round": t, "rounds": n, "sparsity": sparsity},
            ),
        )

        artifacts: dict[str, Path] = {}
        after: Measured | None = None
        written: ModelInfo | None = None
        recovered = Recovered()
        verdict: SparseVerdict | None = None
        if not spec.dry_run:
            if after_prune is not None:
                after_prune(outcome.model)
            recovered = recovery.recover(outcome.model)
            verdict = _sparse_verdict(fmt, outcome, info, before.params, m)
            artifacts, written, after = _export_and_measure(
                fmt, outcome.model, out, m, progress, verdict
            )
        metrics = build_metrics(
            outcome=outcome,
            prunable_before=sum(layer.params for layer in info.prunable_layers),
            before=before,
            after=after,
            eval_before=recovery.eval_before,
            recovered=recovered,
        )
        report = write_report(out / "report.json", spec, metrics, outcome, recovered, verdict)
        progress("done", FRACTION["done"], "finished")
        return PipelineResult(metrics, outcome.layers, fmt.name, report, artifacts, written)
    finally:
        _release(model)


def _sparse_verdict(
    fmt: ModelFormat, outcome: PruneOutcome, info: ModelInfo, params_before: int, m: MeasureConfig
) -> SparseVerdict | None:
    """For weights zeroed in place (shapes kept), what the zeros buy on the device, measured."""
    if outcome.params_after != params_before or outcome.nonzero_params_after >= params_before:
        return None
    weights = fmt.layer_weights(outcome.model, info)
    return measure_sparse_verdict(weights, pick_device(m.device))


def _release(model: object) -> None:
    # Formats whose loaded models hold resources (an unpacked checkpoint folder) close them.
    close = getattr(model, "close", None)
    if callable(close):
        close()


def _export_and_measure(
    fmt: ModelFormat,
    model: object,
    out: Path,
    m: MeasureConfig,
    progress: ProgressCallback,
    verdict: SparseVerdict | None,
) -> tuple[dict[str, Path], ModelInfo, Measured]:
    """Write the model, then load the file back through the format's gate and measure it: the
    numbers describe the artifact the user downloads, and prove it loads. The event of this
    step carries the sparse-storage verdict, where there is one."""
    message = "writing the pruned model" + (f"; {verdict.verdict}" if verdict else "")
    progress("exporting", FRACTION["export"], message, verdict.as_dict() if verdict else None)
    artifacts = fmt.save(model, out)
    progress("evaluating", FRACTION["measure"], "reloading the written model and measuring it")
    reloaded, info = fmt.load(artifacts["model"])
    try:
        measured = Measured(
            fmt.measure(reloaded, info, m),
            fmt.count_parameters(reloaded),
            artifacts["model"].stat().st_size,
        )
    finally:
        _release(reloaded)
    return artifacts, info, measured
