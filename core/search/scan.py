"""The sensitivity scan: one unit pruned alone at one ratio, scored on the search data.

A cell (unit, ratio) is independent of every other, so a service can hand cells to as many
processes as it has; :class:`Scanner` is what each of them holds. The model itself is never
changed: each cell prunes a copy.

Example (no service needed)::

    from core.search import Scanner
    scanner = Scanner.open(spec, "cnn.pt2", "digits.npz")
    baseline = scanner.score(None, 0.0)             # {"accuracy": ..., "loss": ...}
    cell = scanner.score(scanner.units()[0].key, 0.5)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core.data import Dataset, batch_range, load_dataset, match_program
from core.errors import InvalidSpec
from core.evaluate import evaluate
from core.formats import detect, get_format
from core.formats.base import MeasureConfig, ModelInfo
from core.formats.pt2.program import module_on
from core.recovery import CALIBRATION_SAMPLES
from core.search.cost import CostModel
from core.search.units import (
    Calibration,
    ScanUnit,
    UnitFamily,
    UnitsOfScanner,
    with_ratios,
)
from core.spec import EvaluationSpec, JobSpec, PruningSpec
from core.structure import prune_program

Program = torch.export.ExportedProgram
_BATCH_NORM = torch.ops.aten.batch_norm.default


class Scanning(Protocol):
    """What a service needs of a scanner, whatever the model's format: the units and grid, one
    cell's scores, the cost model, and how chosen ratios become the spec the pruner runs."""

    @property
    def grid(self) -> tuple[float, ...]: ...

    def units(self) -> list[ScanUnit]: ...

    def cost_model(self) -> CostModel: ...

    def score(self, key: str | None, ratio: float) -> dict[str, float]: ...

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        """``spec`` with the chosen ratios (unit key -> ratio) and no target."""
        ...

    def latency_fraction(self, ratios: Mapping[str, float], config: MeasureConfig) -> float: ...

    def reestimate(self, model: Any) -> int:
        """Re-estimate in the pruned ``model`` what the scan re-estimated in every cell (BatchNorm
        statistics); how many were."""
        ...


Opener = Callable[..., Scanning]
_OPENERS: dict[str, tuple[Opener, bool]] = {}


def register_scanner(fmt: str, opener: Opener, *, reads_targets: bool) -> None:
    """Make ``opener(spec, model_path, search_data, calibration_data, device=None)`` the scanner
    of ``fmt`` models; ``reads_targets``: its scores need the search data's targets
    (classification does, perplexity does not)."""
    _OPENERS[fmt] = (opener, reads_targets)


def open_scanner(
    spec: JobSpec,
    model_path: str | os.PathLike[str],
    search_data: str | os.PathLike[str],
    calibration_data: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> Scanning:
    """The scanner of the model at ``model_path``, by its format.

    Raises:
        InvalidSpec: no scanner is registered for the format.
    """
    fmt = detect(model_path).name
    opener = _opener(fmt)[0]
    return opener(spec, model_path, search_data, calibration_data, device=device)


def scan_reads_targets(fmt: str) -> bool:
    """Whether a scan of ``fmt`` models scores against the search data's targets."""
    return _opener(fmt)[1]


def _opener(fmt: str) -> tuple[Opener, bool]:
    import core.search.builtin  # noqa: F401  (registers the built-in scanners once)

    found = _OPENERS.get(fmt)
    if found is None:
        raise InvalidSpec(f"no sensitivity scan for {fmt!r} models", "pruning")
    return found


@dataclass
class Scanner(UnitsOfScanner):
    """Scores a program with one unit pruned at a time; cells are independent and repeatable."""

    program: Program
    info: ModelInfo
    spec: JobSpec
    data: Dataset
    calibration: Calibration = None
    family: UnitFamily = field(init=False)
    _units: list[ScanUnit] | None = field(default=None, init=False)
    _dense_latency: float | None = field(default=None, init=False)

    @classmethod
    def open(
        cls,
        spec: JobSpec,
        model_path: str | os.PathLike[str],
        search_data: str | os.PathLike[str],
        calibration_data: str | os.PathLike[str] | None = None,
        device: str | None = None,
    ) -> Scanner:
        """Load the model through its format's gate and the first ``search.num_samples`` of the
        search data (matched to the model's inputs). Cells are scored on the CPU (``device`` is
        for scanners of other formats)."""
        fmt = detect(model_path)
        program, info = fmt.load(model_path)
        data = match_program(load_dataset(Path(search_data)), info.inputs)
        n = spec.pruning.search.num_samples if spec.pruning.search else 512
        data = Dataset(
            tuple(t[:n] for t in data.inputs), None if data.targets is None else data.targets[:n]
        )
        calibration = None
        if spec.calibration is not None and calibration_data is not None:
            samples = match_program(load_dataset(Path(calibration_data)), info.inputs)
            n_calibration = spec.calibration.samples(CALIBRATION_SAMPLES)
            calibration = tuple(t[:n_calibration] for t in samples.inputs)
        return cls(program, info, spec, data, calibration)

    @property
    def subject(self) -> Any:
        return self.program

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        return self.family.with_ratios(spec, ratios)

    def reestimate(self, model: Any) -> int:
        return reestimate_program_batchnorm(model, self.data.inputs)

    def latency_fraction(self, ratios: Mapping[str, float], config: MeasureConfig) -> float:
        """Latency of the program pruned at ``ratios`` over the dense program's, measured on
        ``config.device`` (the dense one once)."""
        fmt = get_format(self.info.format)
        if self._dense_latency is None:
            self._dense_latency = fmt.measure(self.program, self.info, config).latency_ms
        pruned = prune_program(self.program, with_ratios(self.spec.pruning, ratios)).program
        return fmt.measure(pruned, self.info, config).latency_ms / self._dense_latency

    def score(self, key: str | None, ratio: float) -> dict[str, float]:
        """Scores (``accuracy``, ``loss``, ...) with unit ``key`` pruned at ``ratio``; the dense
        model's with ``key`` None. BatchNorm statistics are re-estimated on the search data
        first where the model has them: removed channels shift what later layers see."""
        if key is None:
            module = self.program.module()
        else:
            module = self.family.prune_one(
                self.program, self.info, self.spec.pruning, self.unit(key), ratio, self.calibration
            )
            reestimate_batchnorm(module, self.data.inputs)
        return evaluate(module, self.data, self._evaluation(), batch_range(self.info.inputs))

    def _evaluation(self) -> EvaluationSpec:
        base = self.spec.evaluation or EvaluationSpec()
        return base.model_copy(update={"max_samples": None})


@torch.no_grad()
def reestimate_program_batchnorm(program: Program, inputs: tuple[torch.Tensor, ...]) -> int:
    """:func:`reestimate_batchnorm` for an exported program: its running statistics are set, in
    place, to those of ``inputs``. Returns how many BatchNorms there were."""
    module = module_on(program)
    count = reestimate_batchnorm(module, inputs)
    if count:
        state = program.state_dict
        for name, buffer in module.named_buffers():
            if name in state and state[name].shape == buffer.shape:
                state[name].copy_(buffer)
    return count


@torch.no_grad()
def reestimate_batchnorm(module: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> int:
    """Set every BatchNorm's running statistics to those of ``inputs`` (one batch, in training
    mode with momentum 1), then back to inference. Returns how many BatchNorms there were.

    The exported graph fixes the mode in each ``aten.batch_norm`` node (``training`` is argument 5,
    ``momentum`` argument 6), so the nodes are switched, not the module."""
    nodes = [n for n in module.graph.nodes if n.op == "call_function" and n.target == _BATCH_NORM]
    if not nodes:
        return 0
    saved = [(n, n.args[5], n.args[6]) for n in nodes]
    for node in nodes:
        node.update_arg(5, True)
        node.update_arg(6, 1.0)
    module.recompile()
    try:
        module(*inputs)
    finally:
        for node, training, momentum in saved:
            node.update_arg(5, training)
            node.update_arg(6, momentum)
        module.recompile()
    return len(nodes)
