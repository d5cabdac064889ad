"""Scan units of channel and head pruning: the dependency groups of :mod:`core.structure`."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from core.criteria import STRUCTURED_GRANULARITIES
from core.formats.base import ModelInfo
from core.formats.pt2.program import module_on
from core.search.cost import CostModel, TensorCost
from core.search.macs import weight_macs
from core.search.units import Calibration, ScanUnit, UnitFamily, fixed_by_user, with_ratios
from core.spec import PruningSpec
from core.structure import analyze, plan_channels, prune_program
from core.structure.slicing import apply_channels

Program = torch.export.ExportedProgram


class ChannelUnits(UnitFamily):
    """A group is one unit, named by its first layer (as ``layer_sparsity`` addresses it)."""

    format: ClassVar[str] = "pt2"
    granularities: ClassVar[frozenset[str]] = STRUCTURED_GRANULARITIES

    def units(
        self, program: Program, info: ModelInfo, spec: PruningSpec, calibration: Calibration
    ) -> list[ScanUnit]:
        gm = program.module()
        analysis = analyze(gm, heads=spec.granularity == "head")
        probe = spec.model_copy(update={"sparsity": 0.5, "target": None, "search": None})
        plan = plan_channels(gm, analysis, probe, calibration)
        units = []
        for decision in plan.decisions:
            group = decision.group
            if not group.prunable or decision.skipped or group.blocks > 1:
                continue
            if fixed_by_user(spec, (group.layers[0],)) or decision.units < 2:
                continue
            units.append(ScanUnit(group.layers[0], tuple(group.layers), decision.units))
        return units

    def prune_one(
        self,
        program: Program,
        info: ModelInfo,
        spec: PruningSpec,
        unit: ScanUnit,
        ratio: float,
        calibration: Calibration,
    ) -> torch.fx.GraphModule:
        # Sliced in place on a copy, not exported again: the scan only needs to run it.
        gm = module_on(program)
        analysis = analyze(gm, heads=spec.granularity == "head")
        plan = plan_channels(gm, analysis, with_ratios(spec, {unit.key: ratio}), calibration)
        apply_channels(gm, analysis, plan.keep)
        return gm

    def cost_model(
        self, program: Program, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        per_weight, total_macs = weight_macs(program, info)
        state = program.state_dict
        parameters = {name for name, _ in program.named_parameters()}
        tensors: dict[str, TensorCost] = {}

        def tensor(name: str) -> TensorCost:
            if name not in tensors:
                shape = tuple(state[name].shape)
                numel = max(math.prod(shape), 1)
                tensors[name] = TensorCost(
                    shape, per_weight.get(name, 0.0) / numel, name in parameters, {}
                )
            return tensors[name]

        for unit in units:
            # Probe: the unit alone at about half; what shrinks, and by how much per item.
            removed = max(1, unit.size // 2)
            shapes = prune_program(
                program, with_ratios(spec, {unit.key: removed / unit.size}), dry_run=True
            ).shapes
            for name, after in shapes.items():
                cost = tensor(name)
                for dim, (was, now) in enumerate(zip(cost.shape, after, strict=True)):
                    if now != was:
                        cost.shrink.setdefault(dim, {})[unit.key] = (was - now) / removed
        fixed_params = sum(t.numel() for n, t in program.named_parameters() if n not in tensors)
        fixed_macs = total_macs - sum(
            t.macs_per_entry * math.prod(t.shape) for t in tensors.values()
        )
        return CostModel(
            tensors,
            {u.key: u.size for u in units},
            fixed_macs=fixed_macs,
            fixed_params=fixed_params,
        )
