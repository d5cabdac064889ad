"""Scan units of unstructured pruning: each prunable layer's weights."""

from __future__ import annotations

from typing import ClassVar

import torch

from core.allocation import allocate
from core.formats.base import ModelInfo
from core.formats.pt2.program import module_on
from core.masks import weight_masks
from core.search.cost import CostModel, TensorCost
from core.search.units import Calibration, ScanUnit, UnitFamily, fixed_by_user, with_ratios
from core.spec import PruningSpec

Program = torch.export.ExportedProgram


class WeightUnits(UnitFamily):
    """A layer is one unit; zeroed weights leave the MACs of dense kernels as they are."""

    format: ClassVar[str] = "pt2"
    granularities: ClassVar[frozenset[str]] = frozenset({"unstructured"})

    def units(
        self, program: Program, info: ModelInfo, spec: PruningSpec, calibration: Calibration
    ) -> list[ScanUnit]:
        return [
            ScanUnit(layer.name, (layer.name,), layer.params)
            for layer in info.prunable_layers
            if not fixed_by_user(spec, (layer.name,)) and layer.params > 1
        ]

    def prune_one(
        self,
        program: Program,
        info: ModelInfo,
        spec: PruningSpec,
        unit: ScanUnit,
        ratio: float,
        calibration: Calibration,
    ) -> torch.fx.GraphModule:
        gm = module_on(program)
        name = f"{unit.key}.weight"
        owner, _, attr = name.rpartition(".")
        weight = getattr(gm.get_submodule(owner), attr)
        # The user's globs never match a unit (``fixed_by_user``), and checked against this one
        # layer alone they would be refused as matching nothing: this layer is ranked as the
        # pruner ranks it, by its own ratio.
        alone = spec.model_copy(update={"exclude": (), "layer_sparsity": {}})
        one = with_ratios(alone, {unit.key: ratio})
        # Ranked in the pruner's layout: a matrix product's (in, out) weight as its transpose.
        layouts = {layer.name: layer.reduction_dim for layer in info.prunable_layers}
        allocation = allocate(one, {unit.key: weight.numel()})
        keep = weight_masks(one, {unit.key: weight}, allocation, layouts)
        with torch.no_grad():
            weight.mul_(keep[unit.key].to(weight.dtype))
        return gm

    def cost_model(
        self, program: Program, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        state = program.state_dict
        tensors = {
            f"{u.key}.weight": TensorCost(
                (state[f"{u.key}.weight"].numel(),), shrink={0: {u.key: 1.0}}
            )
            for u in units
        }
        fixed = sum(t.numel() for n, t in program.named_parameters() if n not in tensors)
        return CostModel(
            tensors,
            {u.key: u.size for u in units},
            fixed_params=fixed,
            reduces=frozenset({"params"}),
        )
