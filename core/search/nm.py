"""Scan units at ``n:m``: a layer (``pt2``) or a decoder layer (``hf``) is either dense or n:m.

The pattern fixes the ratio (1 - n/m), so each unit has a single grid point: the scan prunes
each unit alone at n:m, and the allocation picks the set of units made n:m (the cost model's
``levels``: dense or 1 - n/m, nothing between). The chosen units reach the pruner through the
spec's own n:m ``sparsity``, the others through ``exclude``: both pruners leave an excluded layer
exactly dense and make every other one exactly n:m, and the resolved spec is one a user could
send again (``layer_sparsity`` does not apply to n:m on ``hf``). A search ``grid`` is refused:
there is no other ratio to try.

Example::

    from core.search import open_scanner
    scanner = open_scanner(spec, "cnn.pt2", "digits.npz")   # granularity "n:m", a target
    scanner.grid                                             # (0.5,) at 2:4
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from core.errors import InvalidSpec
from core.formats.base import ModelInfo
from core.formats.hf.model import count_parameters
from core.masks import nm_removed
from core.pruning.llm.layers import decoder_layers, prunable_linears
from core.pruning.llm.masks import planned_removals
from core.search.cost import CostModel, PatternCost
from core.search.lm import DecoderLayerUnits, _net, layer_glob
from core.search.units import Calibration, ScanUnit, escape_glob, fixed_by_user
from core.search.weights import WeightUnits
from core.spec import DEFAULT_GRID, PruningSpec

Program = torch.export.ExportedProgram
# The spec's validator fills ``n_m`` in for n:m (default 2:4, also beside a target).
_DEFAULT_N_M = (2, 4)


def pattern_ratio(spec: PruningSpec) -> float:
    """The one ratio of an n:m unit: 1 - n/m (rounded, as scan cells are keyed by it)."""
    n, m = spec.n_m or _DEFAULT_N_M
    return round(1 - n / m, 6)


class NmPattern:
    """What the n:m families share: the one-point grid, the cost model and the resolved spec.
    ``glob(key)`` is the ``exclude`` pattern that leaves unit ``key`` dense."""

    def glob(self, key: str) -> str:
        raise NotImplementedError

    @staticmethod
    def pattern_cost(
        spec: PruningSpec, units: list[ScanUnit], dense_params: float, drops: Mapping[str, int]
    ) -> PatternCost:
        """Each unit dense or at the pattern (its one level), which zeroes ``drops[unit]``."""
        ratio = pattern_ratio(spec)
        return PatternCost(
            {},
            {u.key: u.size for u in units},
            fixed_params=dense_params,
            reduces=frozenset({"params"}),
            levels={u.key: (ratio,) for u in units},
            drops={u.key: drops[u.key] for u in units},
        )

    def grid(self, spec: PruningSpec) -> tuple[float, ...]:
        """``(1 - n/m,)``. A ``search.grid`` other than the default is refused rather than
        ignored: a user who asked for ratios should hear that none but this one exists."""
        ratio = pattern_ratio(spec)
        if spec.search is not None and tuple(spec.search.grid) != DEFAULT_GRID:
            n, m = spec.n_m or _DEFAULT_N_M
            raise InvalidSpec(
                f"at granularity 'n:m' each layer is either dense or {n}:{m} sparse, so the scan "
                f"tries the one ratio {ratio:g} and the search chooses which layers are {n}:{m}; "
                "leave 'grid' out",
                "pruning.search.grid",
            )
        return (ratio,)

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        """The n:m spec with every unit of ``ratios`` at 0 excluded (left dense) and no target.
        ``ratios`` must name every unit, as the allocation's choices do: a unit left out would
        be n:m."""
        n, m = spec.n_m or _DEFAULT_N_M
        dense = [self.glob(key) for key, ratio in ratios.items() if ratio <= 0]
        return spec.model_copy(
            update={
                "sparsity": 1 - n / m,
                "n_m": (n, m),
                "exclude": (*spec.exclude, *(g for g in dense if g not in spec.exclude)),
                "target": None,
                "search": None,
            }
        )


class NmWeightUnits(NmPattern, WeightUnits):
    """``pt2`` at ``n:m``: a layer is one unit, dense or n:m along its input channels. A layer
    the pattern would leave whole (fewer input channels than a run needs) is no unit."""

    granularities: ClassVar[frozenset[str]] = frozenset({"n:m"})

    def glob(self, key: str) -> str:
        return escape_glob(key)

    def units(
        self, program: Program, info: ModelInfo, spec: PruningSpec, calibration: Calibration
    ) -> list[ScanUnit]:
        drops = _layer_drops(info, spec)
        return [u for u in super().units(program, info, spec, calibration) if drops[u.key] > 0]

    def cost_model(
        self, program: Program, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        dense = sum(t.numel() for _, t in program.named_parameters())
        return self.pattern_cost(spec, units, dense, _layer_drops(info, spec))


def _layer_drops(info: ModelInfo, spec: PruningSpec) -> dict[str, int]:
    """Weights n:m zeroes in each prunable layer: the runs lie along its input channels
    (``reduction_dim``), every other dimension repeats them."""
    n, m = spec.n_m or _DEFAULT_N_M
    out = {}
    for layer in info.prunable_layers:
        # A weight of rank > 2 (a convolution) reduces over dim 1, as the masker ranks it.
        dim = layer.reduction_dim if len(layer.shape) == 2 else 1
        length = layer.shape[dim] if len(layer.shape) > 1 else layer.shape[0]
        out[layer.name] = layer.params // max(length, 1) * nm_removed(length, n, m)
    return out


class NmDecoderLayerUnits(NmPattern, DecoderLayerUnits):
    """``hf`` at ``n:m``: a decoder layer is one unit, its linears all dense or all n:m. A
    linear the user excludes stays dense and out of its layer's unit (the rest of the layer is
    still searched: ``exclude`` is how n:m leaves layers dense)."""

    granularities: ClassVar[frozenset[str]] = frozenset({"n:m"})

    def glob(self, key: str) -> str:
        return layer_glob(key)

    def units(
        self, program: Any, info: ModelInfo, spec: PruningSpec, calibration: Any
    ) -> list[ScanUnit]:
        out = []
        for layer in decoder_layers(_net(program)):
            linears = [lin for lin in layer.linears if not fixed_by_user(spec, (lin.name,))]
            if linears:
                names = tuple(lin.name for lin in linears)
                out.append(ScanUnit(layer.name, names, sum(lin.weight.numel() for lin in linears)))
        return out

    def cost_model(
        self, program: Any, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        net = _net(program)
        linears = prunable_linears(net)
        n_m, ratio = spec.n_m or _DEFAULT_N_M, pattern_ratio(spec)
        drops = {
            u.key: sum(planned_removals(linears[n].shape, ratio, n_m, block=None) for n in u.layers)
            for u in units
        }
        return self.pattern_cost(spec, units, float(count_parameters(net)), drops)
