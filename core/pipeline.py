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

from core.allocation import Allocation, allocate
from core.archive import ArchiveInfo
from core.masks import weight_masks
from core.metrics import count_macs, median_latency_ms, sparse_size_bytes
from core.program import batch_size_for, load_program, save_program, synthetic_inputs
from core.spec import SPEC_VERSION, STRUCTURED, JobSpec
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
) -> PipelineResult:
    """Prune the program at ``model_path`` as ``spec`` says and write the artifacts to ``out_dir``.

    Writes ``report.json`` always; ``model.pt2`` (loads with ``torch.export.load``, same dynamic
    dimensions as the input) and ``weights.safetensors`` (original parameter names) unless
    ``spec.dry_run``.

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
        return _run_structured(spec, program, info, Path(model_path), out, m, progress, before)

    progress("pruning", 0.3, "ranking weights")
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
    prunable_before = sum(layer.params for layer in info.prunable_layers)
    prunable_nonzero = sum(layer.nonzero for layer in layers)
    zeroed_by_plan = (
        sum(int(state[f"{n}.weight"].count_nonzero()) for n in planned)
        - sum(layer.nonzero for layer in layers if layer.name in planned)
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


def _run_structured(
    spec: JobSpec,
    program: torch.export.ExportedProgram,
    info: ArchiveInfo,
    model_path: Path,
    out: Path,
    m: MeasureConfig,
    progress: ProgressCallback,
    before: _Measured,
) -> PipelineResult:
    """Channel pruning: remove whole channels with everything coupled to them, re-export.

    The dry run writes the pre-flight report (every group, what it would lose, what is blocked
    and why) and prunes nothing.
    """
    batch = batch_size_for(info.inputs, m.batch_size)
    params_before = sum(p.numel() for p in program.parameters())
    progress("pruning", 0.3, "building channel groups from the graph")
    structured = prune_program(program, spec.pruning, dry_run=spec.dry_run)
    pruned = structured.program
    layers = []
    state = pruned.state_dict
    for layer in info.prunable_layers:
        name = f"{layer.name}.weight"
        shape = structured.shapes.get(name, layer.shape)
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
