"""The scanner of language models (``hf``), and their units at ``unstructured``: one decoder
layer each. (At ``width`` the units are the width kinds: :mod:`core.search.lm_width`.) The
scanner is the same at every granularity: its family says how units are pruned for a cell
(:meth:`LmUnits.applied`) and how chosen ratios become the spec the pruner runs.

A decoder layer's linears are pruned together at one ratio with the job's criterion (magnitude,
Wanda or SparseGPT, each ranking within its own rows as the pruner does), and the model is scored
by perplexity on the search text; the layer's weights are then put back, so one loaded model
serves every cell of a process. Per-layer ratios (rather than per-linear) keep the scan at
``layers x grid`` cells, the granularity OWL and the layer-wise LLM sparsity papers allocate at.

Example (no service needed)::

    from core.search import open_scanner
    scanner = open_scanner(spec, "llama.tar", "wiki.txt", "wiki.txt")
    baseline = scanner.score(None, 0.0)          # {"perplexity": ..., "loss": ...}
    cell = scanner.score("model.layers.0", 0.5)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import torch

from core.allocation import removal_count
from core.device import pick_device
from core.formats import detect
from core.formats.base import MeasureConfig, ModelInfo
from core.formats.hf.gate import HfInfo
from core.formats.hf.measure import prefill_latency_ms
from core.formats.hf.model import HfModel, count_parameters
from core.lm_recovery import evaluate_perplexity
from core.pruning.llm.layers import decoder_layers, prunable_linears
from core.pruning.llm.masks import planned_removals
from core.pruning.llm.sequential import prune_causal_lm
from core.pruning.llm.sparsegpt import BLOCK
from core.search.cost import CostModel
from core.search.units import (
    ScanUnit,
    UnitFamily,
    UnitsOfScanner,
    escape_glob,
    fixed_by_user,
)
from core.spec import JobSpec, PruningSpec
from core.text import (
    CALIBRATION_SAMPLES,
    CALIBRATION_SEQ_LEN,
    EVAL_SEQ_LEN,
    resolve_seq_len,
    token_blocks,
)

# Blocks scored per forward in a cell (the evaluation's batch size is capped the same way).
_BATCH = 8


def layer_glob(key: str) -> str:
    """The ``layer_sparsity`` glob of every linear inside decoder layer ``key``
    (``model.layers.1.*`` does not match ``model.layers.10``)."""
    return f"{escape_glob(key)}.*"


def lm_with_ratios(spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
    """``spec`` with each decoder layer's ratio on all its linears (after the user's own globs),
    every other linear at 0, and no target: the spec the language-model pruner runs."""
    chosen = {layer_glob(key): ratio for key, ratio in ratios.items()}
    merged = {
        **spec.layer_sparsity,
        **{k: v for k, v in chosen.items() if k not in spec.layer_sparsity},
    }
    return spec.model_copy(
        update={"layer_sparsity": merged, "sparsity": 0.0, "target": None, "search": None}
    )


class LmUnits(UnitFamily, Protocol):
    """What :class:`LmScanner` needs of a family besides its units and cost: the model with
    some units pruned (for one scored forward), and the spec that prunes the chosen ratios."""

    def applied(
        self,
        model: Any,
        info: ModelInfo,
        spec: PruningSpec,
        ratios: Mapping[ScanUnit, float],
        calibration: Any,
    ) -> AbstractContextManager[torch.nn.Module]:
        """The network with ``ratios`` (and whatever the user fixed) pruned, for the ``with``
        block only: the model itself is as it was afterwards."""
        ...

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        """``spec`` with the chosen ratios (unit key -> ratio) and no target."""
        ...


class DecoderLayerUnits(UnitFamily):
    """``hf`` models at ``unstructured``: a decoder layer is one unit, all its linears at one
    ratio. Zeroed weights leave the MACs of dense kernels as they are: only parameters fall."""

    format: ClassVar[str] = "hf"
    granularities: ClassVar[frozenset[str]] = frozenset({"unstructured"})

    def units(
        self, program: Any, info: ModelInfo, spec: PruningSpec, calibration: Any
    ) -> list[ScanUnit]:
        out = []
        for layer in decoder_layers(_net(program)):
            names = tuple(lin.name for lin in layer.linears)
            if names and not fixed_by_user(spec, names):
                size = sum(lin.weight.numel() for lin in layer.linears)
                out.append(ScanUnit(layer.name, names, size))
        return out

    def prune_one(
        self,
        program: Any,
        info: ModelInfo,
        spec: PruningSpec,
        unit: ScanUnit,
        ratio: float,
        calibration: Any,
    ) -> Any:
        """Prune ``unit``'s linears in place (the caller restores them: see :class:`LmScanner`)."""
        ids = calibration[0] if calibration else None
        prune_causal_lm(
            _net(program),
            dict.fromkeys(unit.layers, ratio),
            criterion=spec.criterion,
            n_m=spec.n_m,  # set only at n:m (the spec's validator), where it replaces the ratio
            input_ids=ids,
        )
        return program

    @contextmanager
    def applied(
        self,
        model: Any,
        info: ModelInfo,
        spec: PruningSpec,
        ratios: Mapping[ScanUnit, float],
        calibration: Any,
    ) -> Iterator[torch.nn.Module]:
        """Every decoder layer of ``ratios`` pruned at once, in place (calibrated in order, as
        the pruner does); the weights are put back on leaving."""
        net = _net(model)
        pruned = {u: r for u, r in ratios.items() if r > 0}
        if not pruned:
            yield net
            return
        linears = prunable_linears(net)
        saved = {n: linears[n].weight.detach().clone() for u in pruned for n in u.layers}
        try:
            prune_causal_lm(
                net,
                {name: r for u, r in pruned.items() for name in u.layers},
                criterion=spec.criterion,
                n_m=spec.n_m,
                input_ids=calibration[0] if calibration else None,
            )
            yield net
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    linears[name].weight.copy_(weight)

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        return lm_with_ratios(spec, ratios)

    def cost_model(
        self, program: Any, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        net = _net(program)
        linears = prunable_linears(net)
        shapes = {name: linears[name].shape for u in units for name in u.layers}
        in_unit = sum(linears[name].weight.numel() for name in shapes)
        return LmCost(
            tensors={},
            # The greedy steps a layer by one weight per row of its narrowest linear, so every
            # step removes weights (a 0.01 step can round to none on a narrow row).
            sizes={u.key: min(shapes[n][1] for n in u.layers) for u in units},
            fixed_params=float(count_parameters(net) - in_unit),
            reduces=frozenset({"params"}),
            shapes={u.key: tuple(shapes[n] for n in u.layers) for u in units},
            block=BLOCK if spec.criterion == "sparsegpt" else None,
        )


@dataclass(frozen=True)
class LmCost(CostModel):
    """Parameters left as the language-model pruner removes them: per linear,
    ``round(s x in)`` of every row (SparseGPT: per block of 128 columns), so a prediction is
    exactly the count the job reports."""

    shapes: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    block: int | None = None

    def params(self, ratios: Mapping[str, float]) -> float:
        kept = 0.0
        for unit, shapes in self.shapes.items():
            r = ratios.get(unit, 0.0)
            for shape in shapes:
                gone = planned_removals(shape, r, None, block=self.block) if r > 0 else 0
                kept += shape[0] * shape[1] - gone
        return self.fixed_params + kept

    def removed(self, ratios: Mapping[str, float]) -> dict[str, float]:
        return {u: float(removal_count(r, self.sizes[u])) for u, r in ratios.items()}


@dataclass
class LmScanner(UnitsOfScanner):
    """Scores a language model with one unit pruned at a time (a decoder layer for
    ``unstructured``, a width kind for ``width``: its family says how), by perplexity on the
    search text (``loss`` is its log); the model is as loaded again after every cell."""

    model: HfModel
    info: ModelInfo
    spec: JobSpec
    blocks: torch.Tensor
    calibration: tuple[torch.Tensor, ...] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    family: UnitFamily = field(init=False)
    with_ratios: Callable[[PruningSpec, Mapping[str, float]], PruningSpec] = field(init=False)
    _units: list[ScanUnit] | None = field(default=None, init=False)
    _dense: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        # The family's function, not a method of this scanner: a job keeps it for a step back,
        # and it must not keep the scan's model alive.
        self.with_ratios = self._family.with_ratios

    @property
    def _family(self) -> LmUnits:
        return cast(LmUnits, self.family)

    @classmethod
    def open(
        cls,
        spec: JobSpec,
        model_path: str | os.PathLike[str],
        search_data: str | os.PathLike[str],
        calibration_data: str | os.PathLike[str] | None = None,
        device: str | None = None,
    ) -> LmScanner:
        """Load the checkpoint; the search text as the first ``search.num_samples`` blocks at the
        evaluation's ``seq_len``; the calibration text as the job's calibration would be."""
        fmt = detect(model_path)
        model, info = fmt.load(model_path)
        assert isinstance(model, HfModel)
        config = model.model.config
        positions = getattr(config, "max_position_embeddings", None)
        evaluation = spec.evaluation
        asked = evaluation.seq_len if evaluation else None
        seq_len = resolve_seq_len(asked, EVAL_SEQ_LEN, positions)
        n = spec.pruning.search.num_samples if spec.pruning.search else 512

        def blocks(path: str | os.PathLike[str], length: int, count: int) -> torch.Tensor:
            return token_blocks(
                Path(path),
                model.tokenizer,
                length,
                model.eos_token_id,
                count,
                vocab_size=config.vocab_size,
            )

        calibration = None
        if spec.calibration is not None and calibration_data is not None:
            length = resolve_seq_len(spec.calibration.seq_len, CALIBRATION_SEQ_LEN, positions)
            samples = spec.calibration.samples(CALIBRATION_SAMPLES)
            calibration = (blocks(calibration_data, length, samples),)
        return cls(
            model,
            info,
            spec,
            blocks(search_data, seq_len, n),
            calibration,
            pick_device(device),
        )

    @property
    def subject(self) -> Any:
        return self.model

    def latency_fraction(self, ratios: Mapping[str, float], config: MeasureConfig) -> float:
        """Prefill latency with ``ratios`` all applied (and what the user fixed) over the model
        as loaded, on ``config.device``: timed by the function behind the job's own
        ``latency_ms_*`` (the same tokens and timer). At ``width`` the candidate is the
        physically narrowed copy the job would export.

        The dense model is timed again right before each candidate, not once for the search: on
        a shared machine the load drifts over a search (a dense forward here took 200 to 400 ms
        between runs of ``bench/search_hf_latency.py``), and a ratio of two timings taken
        seconds apart cancels most of it."""
        info = self.info
        assert isinstance(info, HfInfo)
        net = _net(self.model).to(self.device)
        units = {self.unit(key): r for key, r in ratios.items()}
        with self._family.applied(
            self.model, info, self.spec.pruning, units, self._calibration()
        ) as pruned:
            dense = prefill_latency_ms(net, info, config)
            return prefill_latency_ms(pruned, info, config) / dense

    @staticmethod
    def reestimate(model: Any) -> int:
        return 0  # no BatchNorm in a decoder

    def score(self, key: str | None, ratio: float) -> dict[str, float]:
        """``perplexity`` and ``loss`` with unit ``key`` pruned at ``ratio`` (with ``key`` None,
        the model as the scan starts from it: dense, but for what the user fixed)."""
        return self.score_ratios({} if key is None else {key: ratio})

    def score_ratios(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """As :meth:`score` with every unit of ``ratios`` pruned at once."""
        _net(self.model).to(self.device)
        units = {self.unit(key): r for key, r in ratios.items()}
        with self._family.applied(
            self.model, self.info, self.spec.pruning, units, self._calibration()
        ) as net:
            return self._perplexity(net)

    def perplexity_rise(self, ratios: Mapping[str, float]) -> float:
        """The relative perplexity rise on the search text with ``ratios`` all applied (and
        what the user fixed), over the model as loaded."""
        if self._dense is None:
            net = _net(self.model).to(self.device)
            self._dense = self._perplexity(net)["perplexity"]
        return self.score_ratios(ratios)["perplexity"] / self._dense - 1.0

    def _calibration(self) -> tuple[torch.Tensor, ...] | None:
        if self.calibration is None:
            return None
        return tuple(t.to(self.device) for t in self.calibration)

    def _perplexity(self, net: torch.nn.Module) -> dict[str, float]:
        scores = evaluate_perplexity(net, self.blocks, batch_size=_BATCH, device=self.device)
        return {"perplexity": scores["perplexity"], "loss": scores["loss"]}


def _net(model: Any) -> torch.nn.Module:
    inner = model.model if isinstance(model, HfModel) else model
    assert isinstance(inner, torch.nn.Module)
    return inner
