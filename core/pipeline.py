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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import save_file

from core.allocation import allocate
from core.archive import ArchiveInfo
from core.masks import weight_masks
from core.metrics import count_macs, median_latency_ms, sparse_size_bytes
from core.program import batch_size_for, load_program, save_program, synthetic_inputs
from core.schedule import RoundHook, agp_fractions, at_fraction, relative_step, rounds_of
from core.spec import SPEC_VERSION, STRUCTURED, JobSpec, PruningSpec
from core.structure import StructuredResult, prune_program

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
    on_round: RoundHook | None = None,
    calibration: tuple[torch.Tensor, ...] | None = None,
) -> PipelineResult:
    """Prune the program at ``model_path`` as ``spec`` says and write the artifacts to ``out_dir``.

    Writes ``report.json`` always; ``model.pt2`` (loads with ``torch.export.load``, same dynamic
    dimensions as the input) and ``weights.safetensors`` (original parameter names) unless
    ``spec.dry_run``. With an iterative schedule, ``on_round`` runs between rounds (fine-tuning).
    ``calibration`` holds the loaded calibration inputs (one tensor per program input, samples
    first) that the data-aware criteria of ``spec.calibration`` need.

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
    if spec.pruning.granularity in STRUCTURED:
        return _run_structured(
            spec, program, info, Path(model_path), out, m, progress, before, on_round, calibration
        )

    progress("pruning", 0.3, "ranking weights")
    if not spec.dry_run:
        program = _early_rounds(spec.pruning, program, info, progress, on_round)
    state = program.state_dict
    layer_names = [layer.name for layer in info.prunable_layers]
    allocation = allocate(
        spec.pruning, {layer.name: layer.params for layer in info.prunable_layers}
    )
    scored = [*allocation.per_layer, *allocation.global_pool]
    masks = weight_masks(spec.pruning, {n: state[f"{n}.weight"] for n in scored}, allocation)

    layers = []
    with torch.no_grad():
        for layer in info.prunable_layers:
            weight = state[f"{layer.name}.weight"]
            keep = masks.get(layer.name)
            if keep is not None and not spec.dry_run:
                weight.mul_(keep.to(weight.dtype))
            alive = weight != 0 if keep is None or not spec.dry_run else (weight != 0) & keep
            nonzero = int(alive.sum())
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
    prunable_before = sum(layer.params for layer in info.prunable_layers)
    prunable_nonzero = sum(layer.nonzero for layer in layers)
    zeroed_by_plan = (
        sum(int(((state[f"{n}.weight"] != 0) & ~keep).sum()) for n, keep in masks.items())
        if spec.dry_run
        else 0
    )
    nonzero_params = sum(int(p.count_nonzero()) for p in program.parameters()) - zeroed_by_plan
    sparse_bytes = sparse_size_bytes(state, (f"{n}.weight" for n in layer_names))

    model_file: Path | None = None
    weights_file: Path | None = None
    after: _Measured | None = None
    size_after: int | None = None
    if not spec.dry_run:
        progress("exporting", 0.6, "writing the pruned program and its weights")
        model_file = out / "model.pt2"
        save_program(program, model_file)
        weights_file = out / "weights.safetensors"
        _save_weights(state, weights_file)
        size_after = model_file.stat().st_size

        progress("evaluating", 0.8, "reloading the exported program and measuring it")
        reloaded, reloaded_info = load_program(model_file)
        after = _measure(reloaded, reloaded_info, m, batch)

    metrics = Metrics(
        sparsity=1.0 - prunable_nonzero / max(prunable_before, 1),
        params_before=params_before,
        params_after=params_before,
        nonzero_params_after=nonzero_params,
        macs_before=before.macs,
        macs_after=after.macs if after else before.macs,
        size_bytes_before=Path(model_path).stat().st_size,
        size_bytes_after=size_after,
        sparse_size_bytes_after=sparse_bytes,
        latency_ms_before=before.latency_ms,
        latency_ms_after=after.latency_ms if after else None,
        latency_batch_size=batch,
        device=m.device,
    )
    report_file = out / "report.json"
    _write_report(report_file, spec, metrics, layers, allocation.excluded)
    progress("done", 1.0, "finished")
    return PipelineResult(
        metrics=metrics,
        layers=tuple(layers),
        report_path=report_file,
        model_path=model_file,
        weights_path=weights_file,
    )


def _early_rounds(
    pruning: PruningSpec,
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    progress: ProgressCallback,
    on_round: RoundHook | None,
) -> torch.export.ExportedProgram:
    """Rounds 1..n-1 of an iterative schedule, zeroing weights in place; the last round is the
    one-shot step at the final ratios. Zeroed weights score lowest, so rounds are nested."""
    rounds = rounds_of(pruning)
    sizes = {layer.name: layer.params for layer in info.prunable_layers}
    for t, fraction in enumerate(agp_fractions(rounds)[:-1], start=1):
        step = at_fraction(pruning, fraction)
        allocation = allocate(step, sizes)
        names = [*allocation.per_layer, *allocation.global_pool]
        state = program.state_dict
        masks = weight_masks(step, {n: state[f"{n}.weight"] for n in names}, allocation)
        _zero(state, masks)
        progress(
            "pruning",
            0.3 + 0.05 * t / rounds,
            f"round {t} of {rounds}: sparsity {step.sparsity:.3f}",
            {"round": t, "rounds": rounds, "sparsity": step.sparsity},
        )
        if on_round is not None:
            program = on_round(t, rounds, program) or program
            _zero(program.state_dict, masks)  # fine-tuning must not regrow what was pruned
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
    on_round: RoundHook | None,
    calibration: tuple[torch.Tensor, ...] | None,
) -> PipelineResult:
    """Channel pruning: remove whole channels with everything coupled to them, re-export.

    The dry run writes the pre-flight report (every group, what it would lose, what is blocked
    and why) and prunes nothing.
    """
    batch = batch_size_for(info.inputs, m.batch_size)
    params_before = sum(p.numel() for p in program.parameters())
    progress("pruning", 0.3, "building channel groups from the graph")
    structured, kept_out, kept_in = _structured_rounds(
        spec.pruning, program, progress, on_round, spec.dry_run, calibration
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
    prunable_before = sum(layer.params for layer in info.prunable_layers)
    prunable_nonzero = sum(layer.nonzero for layer in layers)
    parameter_names = {name for name, _ in program.named_parameters()}
    removed = sum(
        program.state_dict[name].numel() - math.prod(shape)
        for name, shape in structured.shapes.items()
        if name in parameter_names
    )
    params_after = sum(p.numel() for p in pruned.parameters()) - (removed if spec.dry_run else 0)
    nonzero_params = sum(int(p.count_nonzero()) for p in pruned.parameters())
    sparse_bytes = sparse_size_bytes(state, (f"{layer.name}.weight" for layer in layers))

    model_file: Path | None = None
    weights_file: Path | None = None
    after: _Measured | None = None
    size_after: int | None = None
    if not spec.dry_run:
        progress("exporting", 0.6, "writing the smaller program and its weights")
        model_file = out / "model.pt2"
        save_program(pruned, model_file)
        weights_file = out / "weights.safetensors"
        _save_weights(pruned.state_dict, weights_file)
        size_after = model_file.stat().st_size

        progress("evaluating", 0.8, "reloading the exported program and measuring it")
        reloaded, reloaded_info = load_program(model_file)
        after = _measure(reloaded, reloaded_info, m, batch)

    metrics = Metrics(
        sparsity=1.0 - prunable_nonzero / max(prunable_before, 1),
        params_before=params_before,
        params_after=params_after,
        nonzero_params_after=nonzero_params if not spec.dry_run else params_after,
        macs_before=before.macs,
        macs_after=after.macs if after else before.macs,
        size_bytes_before=model_path.stat().st_size,
        size_bytes_after=size_after,
        sparse_size_bytes_after=sparse_bytes,
        latency_ms_before=before.latency_ms,
        latency_ms_after=after.latency_ms if after else None,
        latency_batch_size=batch,
        device=m.device,
    )
    report_file = out / "report.json"
    excluded = tuple(
        name
        for d in structured.plan.decisions
        if d.skipped == "excluded"
        for name in d.group.layers
    )
    _write_report(report_file, spec, metrics, layers, excluded, structured)
    progress("done", 1.0, "finished")
    return PipelineResult(
        metrics=metrics,
        layers=tuple(layers),
        report_path=report_file,
        model_path=model_file,
        weights_path=weights_file,
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


def _write_report(
    path: Path,
    spec: JobSpec,
    metrics: Metrics,
    layers: list[LayerResult],
    excluded: tuple[str, ...],
    structured: StructuredResult | None = None,
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
    path.write_text(json.dumps(report, indent=2))
