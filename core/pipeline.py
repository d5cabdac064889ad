"""The one entry point: load -> prune -> export -> measure, with progress reported as it goes.

Example (no service needed)::

    from core.pipeline import run
    from core.spec import JobSpec, PruningSpec

    spec = JobSpec(pruning=PruningSpec(criterion="l1", granularity="unstructured",
                                       sparsity=0.8, scope="global"))
    result = run(spec, "resnet.pt2", "out/")
    print(result.metrics.sparsity, result.model_path)   # 0.8, out/model.pt2
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import save_file

from core.allocation import Allocation, allocate
from core.data import BatchRange, Dataset, batch_range, load_dataset, match_program
from core.device import pick_device
from core.errors import InvalidSpec
from core.evaluate import evaluate
from core.finetune import (
    Checkpointing,
    FineTuneResult,
    fine_tune,
    plan_steps,
    snapshot_state,
)
from core.formats.pt2 import Pt2Info as ArchiveInfo
from core.formats.pt2.program import (
    batch_size_for,
    load_program,
    module_on,
    save_program,
    synthetic_inputs,
)
from core.masks import weight_masks
from core.metrics import count_macs, median_latency_ms, sparse_size_bytes
from core.schedule import RoundHook, agp_fractions, at_fraction, relative_step, rounds_of
from core.spec import SPEC_VERSION, STRUCTURED, FineTuneSpec, JobSpec, PruningSpec
from core.structure import StructuredResult, prune_program
from core.unstructured import prune_magnitude_in_place

Stage = Literal["loading", "pruning", "fine_tuning", "evaluating", "exporting", "done"]


class ProgressCallback(Protocol):
    """Told where the job is: ``stage``, the fraction of the whole job done, a message, and
    optional ``data`` worth keeping as an event (an epoch's loss, say). Called often (every
    optimizer step while training), so it must be cheap; it may raise to stop the job."""

    def __call__(
        self, stage: Stage, fraction: float, message: str, data: dict[str, Any] | None = None
    ) -> None: ...


@dataclass(frozen=True)
class MeasureConfig:
    """How latency is measured: on ``device``, at ``batch_size``, median of ``repeats`` runs."""

    batch_size: int = 32
    warmup: int = 3
    repeats: int = 10
    device: str = "cpu"


@dataclass(frozen=True)
class PipelineData:
    """Dataset files (``.npz``/``.safetensors``, see :mod:`core.data`) for the spec's
    ``fine_tune``, ``evaluation`` and ``calibration``; each is required when its spec is given."""

    fine_tune: Path | None = None
    evaluation: Path | None = None
    calibration: Path | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """Where fine-tuning and evaluation run (default: CUDA when available, else CPU), and where
    fine-tuning checkpoints (``None``: it does not; an existing checkpoint is resumed)."""

    device: str | None = None
    checkpoint: Path | None = None
    checkpoint_every_steps: int = 50


@dataclass(frozen=True)
class LayerResult:
    """One prunable layer before and after."""

    name: str
    kind: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params: int
    nonzero: int
    sparsity: float


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


@dataclass(frozen=True)
class PipelineResult:
    """Paths of the written artifacts (``None`` for a dry run) and the measurements."""

    metrics: Metrics
    layers: tuple[LayerResult, ...]
    report_path: Path
    model_path: Path | None
    weights_path: Path | None


def _noop(stage: Stage, fraction: float, message: str, data: dict[str, Any] | None = None) -> None:
    return None


@dataclass
class _Measured:
    macs: int
    latency_ms: float


def _measure(
    program: torch.export.ExportedProgram, info: ArchiveInfo, m: MeasureConfig, batch: int
) -> _Measured:
    module = program.module()
    inputs = synthetic_inputs(info.inputs, batch)

    def call() -> object:
        return module(*inputs)

    return _Measured(count_macs(call, batch), median_latency_ms(call, m.warmup, m.repeats))


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
) -> PipelineResult:
    """Prune the program at ``model_path`` as ``spec`` says and write the artifacts to ``out_dir``.

    Writes ``report.json`` always; ``model.pt2`` (loads with ``torch.export.load``, same dynamic
    dimensions as the input) and ``weights.safetensors`` (original parameter names) unless
    ``spec.dry_run``. With ``spec.evaluation`` the program is scored before pruning, after pruning
    and after fine-tuning; with ``spec.fine_tune`` it is retrained with its pruned weights held
    at zero (both skipped after pruning in a dry run). Their datasets come from ``data``; the
    data-aware criteria read ``data.calibration``. An iterative schedule calls ``on_round`` after
    every round but the last (default: :func:`round_hook`, evaluation and a share of the
    fine-tuning).

    Raises:
        core.errors.ShearsError: the file was refused, the spec does not fit this model, or a step
            failed; ``code`` says which. Whatever ``on_progress`` raises propagates unchanged.
    """
    m = measure or MeasureConfig()
    progress = on_progress or _noop
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    progress("loading", 0.0, "validating and loading the program")
    program, info = load_program(model_path)
    batch = batch_size_for(info.inputs, m.batch_size)
    params_before = sum(p.numel() for p in program.parameters())
    before = _measure(program, info, m, batch)
    train = training or TrainingConfig()
    feeds = _load_feeds(spec, data or PipelineData(), info)
    teacher = snapshot_state(program) if _distills(spec) else None  # dense, before pruning
    eval_before = _evaluate_stage(
        program, info, spec, feeds, train, progress, 0.2, "before pruning"
    )
    recovery = _Recovery(feeds, teacher, train, eval_before)
    rounds = rounds_of(spec.pruning)
    if on_round is None and rounds > 1:
        on_round = round_hook(info, spec, feeds, teacher, train, progress, rounds)
    if spec.pruning.granularity in STRUCTURED:
        return _run_structured(
            spec, program, info, Path(model_path), out, m, progress, before, recovery, on_round
        )

    progress("pruning", 0.3, "ranking weights")
    if not spec.dry_run:
        program = _early_rounds(spec, program, info, progress, on_round)
    state = program.state_dict
    layer_names = [layer.name for layer in info.prunable_layers]
    allocation = allocate(
        spec.pruning, {layer.name: layer.params for layer in info.prunable_layers}
    )
    scored = {n: state[f"{n}.weight"] for n in [*allocation.per_layer, *allocation.global_pool]}
    planned = _prune_weights(spec, scored, allocation)

    layers = []
    with torch.no_grad():
        for layer in info.prunable_layers:
            weight = state[f"{layer.name}.weight"]
            nonzero = int(weight.count_nonzero())
            if spec.dry_run and layer.name in planned:
                # Weights already zero are always among the lowest-ranked.
                nonzero = min(nonzero, weight.numel() - planned[layer.name])
            layers.append(
                LayerResult(
                    name=layer.name,
                    kind=layer.kind,
                    shape_before=layer.shape,
                    shape_after=tuple(weight.shape),
                    params=weight.numel(),
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / max(weight.numel(), 1),
                )
            )
    zeroed_by_plan = (
        sum(int(state[f"{n}.weight"].count_nonzero()) for n in planned)
        - sum(layer.nonzero for layer in layers if layer.name in planned)
        if spec.dry_run
        else 0
    )
    nonzero_params = sum(int(p.count_nonzero()) for p in program.parameters()) - zeroed_by_plan
    return _finish(
        program,
        info,
        spec,
        layers,
        params=(params_before, params_before),
        nonzero_params_after=nonzero_params,
        sparse_bytes=sparse_size_bytes(state, (f"{n}.weight" for n in layer_names)),
        excluded=allocation.excluded,
        structured=None,
        export_message="writing the pruned program and its weights",
        out=out,
        m=m,
        batch=batch,
        model_path=Path(model_path),
        before=before,
        recovery=recovery,
        progress=progress,
    )


def _early_rounds(
    spec: JobSpec,
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    progress: ProgressCallback,
    on_round: RoundHook | None,
) -> torch.export.ExportedProgram:
    """Rounds 1..n-1 of an iterative schedule, zeroing weights in place; the last round is the
    one-shot step at the final ratios. Zeroed weights score lowest, so rounds are nested."""
    rounds = rounds_of(spec.pruning)
    sizes = {layer.name: layer.params for layer in info.prunable_layers}
    for t, fraction in enumerate(agp_fractions(rounds)[:-1], start=1):
        step = at_fraction(spec.pruning, fraction)
        allocation = allocate(step, sizes)
        state = program.state_dict
        names = [*allocation.per_layer, *allocation.global_pool]
        weights = {n: state[f"{n}.weight"] for n in names}
        _prune_weights(spec.model_copy(update={"pruning": step}), weights, allocation)
        progress(
            "pruning",
            0.3 + 0.05 * t / rounds,
            f"round {t} of {rounds}: sparsity {step.sparsity:.3f}",
            {"round": t, "rounds": rounds, "sparsity": step.sparsity},
        )
        if on_round is not None:
            keep = {n: w != 0 for n, w in weights.items()}
            program = on_round(t, rounds, program) or program
            _zero(program.state_dict, keep)  # whatever the hook did, pruned weights stay zero
    return program


def _zero(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, keep in masks.items():
            weight = state[f"{name}.weight"]
            weight.mul_(keep.to(weight.dtype))


def _structured_rounds(
    pruning: PruningSpec,
    program: torch.export.ExportedProgram,
    progress: ProgressCallback,
    on_round: RoundHook | None,
    dry_run: bool,
    calibration: tuple[torch.Tensor, ...] | None,
) -> tuple[StructuredResult, dict[str, list[int]], dict[str, list[int]]]:
    """Every round of a structured schedule; the kept indices are composed across rounds so the
    report names channels of the uploaded program."""
    rounds = 1 if dry_run else rounds_of(pruning)
    fractions = [0.0, *agp_fractions(rounds)]
    kept_out: dict[str, list[int]] = {}
    kept_in: dict[str, list[int]] = {}
    for t in range(1, rounds + 1):
        step = relative_step(pruning, fractions[t - 1], fractions[t]) if rounds > 1 else pruning
        result = prune_program(program, step, dry_run=dry_run, calibration=calibration)
        for composed, now in ((kept_out, result.kept_out), (kept_in, result.kept_in)):
            for layer, kept in now.items():
                previous = composed.get(layer)
                composed[layer] = [previous[i] for i in kept] if previous is not None else kept
        program = result.program
        if t < rounds:
            progress(
                "pruning",
                0.3 + 0.05 * t / rounds,
                f"round {t} of {rounds}",
                {"round": t, "rounds": rounds, "sparsity": pruning.sparsity * fractions[t]},
            )
            if on_round is not None:
                program = on_round(t, rounds, program) or program
    return result, kept_out, kept_in


def _run_structured(
    spec: JobSpec,
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    model_path: Path,
    out: Path,
    m: MeasureConfig,
    progress: ProgressCallback,
    before: _Measured,
    recovery: _Recovery,
    on_round: RoundHook | None,
) -> PipelineResult:
    """Channel pruning: remove whole channels with everything coupled to them, re-export.

    The dry run writes the pre-flight report (every group, what it would lose, what is blocked
    and why) and prunes nothing.
    """
    batch = batch_size_for(info.inputs, m.batch_size)
    params_before = sum(p.numel() for p in program.parameters())
    progress("pruning", 0.3, "building channel groups from the graph")
    structured, kept_out, kept_in = _structured_rounds(
        spec.pruning, program, progress, on_round, spec.dry_run, recovery.feeds.calibration
    )
    structured.kept_out, structured.kept_in = kept_out, kept_in
    pruned = structured.program
    layers = []
    state = pruned.state_dict
    for layer in info.prunable_layers:
        name = f"{layer.name}.weight"
        shape = structured.shapes.get(name, layer.shape) if spec.dry_run else state[name].shape
        params = math.prod(shape)
        if spec.dry_run:
            nonzero = structured.nonzero.get(name, int(program.state_dict[name].count_nonzero()))
        else:
            nonzero = int(state[name].count_nonzero())
        layers.append(
            LayerResult(
                name=layer.name,
                kind=layer.kind,
                shape_before=layer.shape,
                shape_after=tuple(shape),
                params=params,
                nonzero=nonzero,
                sparsity=1.0 - nonzero / max(layer.params, 1),
            )
        )
    parameter_names = {name for name, _ in program.named_parameters()}
    removed = sum(
        program.state_dict[name].numel() - math.prod(shape)
        for name, shape in structured.shapes.items()
        if name in parameter_names
    )
    params_after = sum(p.numel() for p in pruned.parameters()) - (removed if spec.dry_run else 0)
    nonzero_params = sum(int(p.count_nonzero()) for p in pruned.parameters())
    excluded = tuple(
        name
        for d in structured.plan.decisions
        if d.skipped == "excluded"
        for name in d.group.layers
    )
    # The smaller program trains like any other: its removed channels are gone, not masked.
    return _finish(
        pruned,
        info,
        spec,
        layers,
        params=(params_before, params_after),
        nonzero_params_after=nonzero_params if not spec.dry_run else params_after,
        sparse_bytes=sparse_size_bytes(state, (f"{layer.name}.weight" for layer in layers)),
        excluded=excluded,
        structured=structured,
        export_message="writing the smaller program and its weights",
        out=out,
        m=m,
        batch=batch,
        model_path=model_path,
        before=before,
        recovery=recovery,
        progress=progress,
    )


def _finish(
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    spec: JobSpec,
    layers: list[LayerResult],
    *,
    params: tuple[int, int],
    nonzero_params_after: int,
    sparse_bytes: int,
    excluded: tuple[str, ...],
    structured: StructuredResult | None,
    export_message: str,
    out: Path,
    m: MeasureConfig,
    batch: int,
    model_path: Path,
    before: _Measured,
    recovery: _Recovery,
    progress: ProgressCallback,
) -> PipelineResult:
    """How both pruning paths end: fine-tune to recover, export and measure the pruned program
    (not in a dry run), then the metrics, the report and the result."""
    recovered = _recover(program, info, spec, recovery, progress)
    exported = (
        None
        if spec.dry_run
        else _export_and_measure(program, out, m, batch, progress, export_message)
    )
    prunable_before = sum(layer.params for layer in info.prunable_layers)
    metrics = _metrics(
        sparsity=1.0 - sum(layer.nonzero for layer in layers) / max(prunable_before, 1),
        params=params,
        nonzero_params_after=nonzero_params_after,
        sparse_bytes=sparse_bytes,
        before=before,
        exported=exported,
        model_path=model_path,
        batch=batch,
        device=m.device,
        recovery=recovery,
        recovered=recovered,
    )
    report_file = out / "report.json"
    _write_report(
        report_file,
        spec,
        metrics,
        layers,
        excluded,
        structured,
        fine_tune=_tuned_report(recovered.tuned),
    )
    progress("done", 1.0, "finished")
    return PipelineResult(
        metrics=metrics,
        layers=tuple(layers),
        report_path=report_file,
        model_path=exported.model_file if exported else None,
        weights_path=exported.weights_file if exported else None,
    )


def _metrics(
    *,
    sparsity: float,
    params: tuple[int, int],
    nonzero_params_after: int,
    sparse_bytes: int,
    before: _Measured,
    exported: _Exported | None,
    model_path: Path,
    batch: int,
    device: str,
    recovery: _Recovery,
    recovered: _Recovered,
) -> Metrics:
    """The contract's metrics; the "after" figures are those of the exported artifact (a dry run
    exports nothing, so its MACs are the unchanged ones and its latency and size are unknown)."""
    after = exported.measured if exported else None
    return Metrics(
        sparsity=sparsity,
        params_before=params[0],
        params_after=params[1],
        nonzero_params_after=nonzero_params_after,
        macs_before=before.macs,
        macs_after=after.macs if after else before.macs,
        size_bytes_before=model_path.stat().st_size,
        size_bytes_after=exported.size_bytes if exported else None,
        sparse_size_bytes_after=sparse_bytes,
        latency_ms_before=before.latency_ms,
        latency_ms_after=after.latency_ms if after else None,
        latency_batch_size=batch,
        device=device,
        eval_before=recovery.eval_before,
        eval_after_pruning=recovered.eval_after_pruning,
        eval_after_fine_tune=recovered.eval_after_fine_tune,
    )


@dataclass(frozen=True)
class _Exported:
    model_file: Path
    weights_file: Path
    size_bytes: int
    measured: _Measured


def _export_and_measure(
    program: torch.export.ExportedProgram,
    out: Path,
    m: MeasureConfig,
    batch: int,
    progress: ProgressCallback,
    message: str,
) -> _Exported:
    """Write the program and its weights, then reload the file through the gate and measure it:
    the numbers describe the artifact the user downloads, and prove it loads."""
    progress("exporting", 0.6, message)
    model_file = out / "model.pt2"
    save_program(program, model_file)
    weights_file = out / "weights.safetensors"
    _save_weights(program.state_dict, weights_file)
    progress("evaluating", 0.8, "reloading the exported program and measuring it")
    reloaded, reloaded_info = load_program(model_file)
    return _Exported(
        model_file,
        weights_file,
        model_file.stat().st_size,
        _measure(reloaded, reloaded_info, m, batch),
    )


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share storage (tied weights): give each its own copy then.
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    save_file(tensors, str(path), metadata={"format": "pt", "producer": "shears"})


_MAGNITUDE = ("l1", "l2", "lp")


def _prune_weights(
    spec: JobSpec, weights: dict[str, torch.Tensor], allocation: Allocation
) -> dict[str, int]:
    """Zero weights in place (unless a dry run); returns how many each layer loses.

    Magnitude criteria at unstructured granularity take the bounded-memory path (no score or
    mask tensors); the others rank through score tensors and keep-masks.
    """
    if spec.pruning.granularity == "unstructured" and spec.pruning.criterion in _MAGNITUDE:
        return prune_magnitude_in_place(weights, allocation, apply=not spec.dry_run)
    masks = weight_masks(spec.pruning, weights, allocation)
    if not spec.dry_run:
        with torch.no_grad():
            for name, keep in masks.items():
                weights[name].mul_(keep.to(weights[name].dtype))
    return {name: int((~keep).sum()) for name, keep in masks.items()}


def _write_report(
    path: Path,
    spec: JobSpec,
    metrics: Metrics,
    layers: list[LayerResult],
    excluded: tuple[str, ...],
    structured: StructuredResult | None = None,
    fine_tune: dict[str, Any] | None = None,
) -> None:
    kept_out = structured.kept_out if structured else {}
    kept_in = structured.kept_in if structured else {}
    report: dict[str, Any] = {
        "spec_version": SPEC_VERSION,
        "spec": spec.model_dump(mode="json"),
        "dry_run": spec.dry_run,
        "metrics": asdict(metrics),
        "excluded_layers": list(excluded),
        "layers": [
            # None: every channel kept (always so for unstructured pruning).
            {
                **asdict(layer),
                "kept_channels": kept_out.get(layer.name),
                "kept_input_channels": kept_in.get(layer.name),
            }
            for layer in layers
        ],
    }
    if structured is not None:
        report["groups"] = structured.report()
    if fine_tune is not None:
        report["fine_tune"] = fine_tune
    path.write_text(json.dumps(report, indent=2))


# --- datasets, evaluation and fine-tuning stages --------------------------------------------------


@dataclass(frozen=True)
class _Feeds:
    """The job's datasets, read and matched to the program's inputs."""

    fine_tune: Dataset | None
    evaluation: Dataset | None
    limits: BatchRange
    # The first ``calibration.num_samples`` inputs, one tensor per program input, for the
    # data-aware criteria of the pruning step.
    calibration: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class _Recovery:
    """What the stages after pruning need, prepared before it: datasets, the dense teacher."""

    feeds: _Feeds
    teacher: dict[str, torch.Tensor] | None
    train: TrainingConfig
    eval_before: dict[str, float] | None


@dataclass(frozen=True)
class _Recovered:
    eval_after_pruning: dict[str, float] | None = None
    eval_after_fine_tune: dict[str, float] | None = None
    tuned: FineTuneResult | None = None


def _recover(
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    spec: JobSpec,
    r: _Recovery,
    progress: ProgressCallback,
) -> _Recovered:
    """Evaluate the pruned program, fine-tune it in place, evaluate again (nothing in a dry run)."""
    if spec.dry_run:
        return _Recovered()
    after_pruning = _evaluate_stage(
        program, info, spec, r.feeds, r.train, progress, 0.32, "after pruning"
    )
    tuned = _fine_tune_stage(program, info, spec, r.feeds, r.teacher, r.train, progress)
    after_tuning = (
        _evaluate_stage(program, info, spec, r.feeds, r.train, progress, 0.57, "after fine-tuning")
        if tuned is not None
        else None
    )
    return _Recovered(after_pruning, after_tuning, tuned)


def _distills(spec: JobSpec) -> bool:
    return spec.fine_tune is not None and spec.fine_tune.loss == "distillation"


def _load_feeds(spec: JobSpec, data: PipelineData, info: ArchiveInfo) -> _Feeds:
    """Read the datasets the spec asks for and check them against the model before any work:
    a dataset that cannot feed the program fails the job here, not hours into training."""
    read: dict[Path, Dataset] = {}

    def feed(what: str, path: Path | None, needs_targets: bool) -> Dataset:
        if path is None:
            raise InvalidSpec(f"'{what}' needs a dataset, and none was given")
        if path not in read:
            read[path] = match_program(load_dataset(path), info.inputs)
        dataset = read[path]
        if needs_targets and dataset.targets is None:
            raise InvalidSpec(f"'{what}' needs a dataset with targets; this one has none")
        return dataset

    calibration = None
    if spec.calibration is not None:
        samples = feed("calibration", data.calibration, False)
        calibration = tuple(t[: spec.calibration.num_samples] for t in samples.inputs)
    return _Feeds(
        fine_tune=feed("fine_tune", data.fine_tune, spec.fine_tune.needs_targets)
        if spec.fine_tune
        else None,
        evaluation=feed("evaluation", data.evaluation, True) if spec.evaluation else None,
        limits=batch_range(info.inputs),
        calibration=calibration,
    )


def _evaluate_stage(
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    spec: JobSpec,
    feeds: _Feeds,
    train: TrainingConfig,
    progress: ProgressCallback,
    fraction: float,
    when: str,
) -> dict[str, float] | None:
    if spec.evaluation is None or feeds.evaluation is None:
        return None
    progress("evaluating", fraction, f"evaluating {when}")
    device = pick_device(train.device)
    module = module_on(program, device)  # eval mode: the graph as it was exported
    metrics = evaluate(module, feeds.evaluation, spec.evaluation, feeds.limits, device)
    progress("evaluating", fraction, f"evaluated {when}", {"when": when, **metrics})
    return metrics


def _fine_tune_stage(
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    spec: JobSpec,
    feeds: _Feeds,
    teacher: dict[str, torch.Tensor] | None,
    train: TrainingConfig,
    progress: ProgressCallback,
) -> FineTuneResult | None:
    if spec.fine_tune is None or feeds.fine_tune is None:
        return None
    start, span = 0.35, 0.2

    # Every optimizer step reports progress: that is where a cancel stops training (the worker's
    # callback raises), and it is throttled there. Each epoch's summary becomes an event.
    def on_step(step: int, total: int, summary: dict[str, float] | None) -> None:
        if summary and "epoch" in summary:
            message = f"epoch {int(summary['epoch'])}: loss {summary['loss']:.4f}"
        elif summary:
            message = f"resumed from the checkpoint at step {step}/{total}"
        else:
            message = f"step {step}/{total}"
        progress("fine_tuning", start + span * step / max(total, 1), message, summary)

    checkpoint = (
        Checkpointing(train.checkpoint, train.checkpoint_every_steps) if train.checkpoint else None
    )
    return fine_tune(
        program,
        feeds.fine_tune,
        spec.fine_tune,
        limits=feeds.limits,
        masked=[f"{layer.name}.weight" for layer in info.prunable_layers],
        teacher_state=teacher,
        device=train.device,
        checkpoint=checkpoint,
        on_step=on_step,
    )


def _tuned_report(tuned: FineTuneResult | None) -> dict[str, Any] | None:
    if tuned is None:
        return None
    return {
        "steps": tuned.steps,
        "epochs": tuned.epochs,
        "device": tuned.device,
        "resumed_from_step": tuned.resumed_from_step,
        "history": list(tuned.history),
    }


def round_hook(
    info: ArchiveInfo,
    spec: JobSpec,
    feeds: _Feeds,
    teacher: dict[str, torch.Tensor] | None,
    train: TrainingConfig,
    progress: ProgressCallback,
    rounds: int,
) -> Callable[[int, int, torch.export.ExportedProgram], None]:
    """The ``on_round`` hook of an iterative schedule, for the pruning step to call after each
    round but the last: evaluate (an event per round with ``{"round", "rounds", ...metrics}``)
    and fine-tune for ``1/rounds`` of the spec's steps. The full fine-tune still runs after the
    last round, as in a one-shot job. Pruned weights stay zero (they are the masked ones)."""
    tune = spec.fine_tune
    share: FineTuneSpec | None = None
    if tune is not None and feeds.fine_tune is not None:
        _, _, total = plan_steps(feeds.fine_tune.num_samples, tune, feeds.limits)
        share = tune.model_copy(update={"steps": max(1, total // rounds), "epochs": None})

    def hook(t: int, n: int, program: torch.export.ExportedProgram) -> None:
        when = f"after round {t} of {n}"
        metrics = _evaluate_stage(program, info, spec, feeds, train, progress, 0.3, when)
        if metrics is not None:
            progress(
                "pruning", 0.3, f"round {t} of {n} evaluated", {"round": t, "rounds": n, **metrics}
            )
        if share is not None and feeds.fine_tune is not None:
            checkpoint = (
                Checkpointing(
                    train.checkpoint.with_name(f"{train.checkpoint.stem}.round{t}.pt"),
                    train.checkpoint_every_steps,
                )
                if train.checkpoint
                else None
            )
            fine_tune(
                program,
                feeds.fine_tune,
                share,
                limits=feeds.limits,
                masked=[f"{layer.name}.weight" for layer in info.prunable_layers],
                teacher_state=teacher,
                device=train.device,
                checkpoint=checkpoint,
                on_step=lambda step, total, data: progress(
                    "fine_tuning", 0.3, f"round {t}: step {step}/{total}", data
                ),
            )

    return hook
