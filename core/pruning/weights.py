"""Weight pruning of ``torch.export`` programs: single weights, n:m patterns or blocks zeroed in
place. The program keeps its shapes; the zeros make it smaller to store in a sparse encoding."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch

from core.allocation import Allocation, allocate
from core.criteria import WEIGHT_GRANULARITIES
from core.formats.base import ModelInfo
from core.masks import weight_masks
from core.metrics import distinct_tensors, sparse_size_bytes
from core.pruning.base import LayerResult, PruneContext, PruneOutcome
from core.schedule import at_fraction
from core.spec import PruningSpec
from core.unstructured import prune_magnitude_in_place

Program = torch.export.ExportedProgram
# Magnitude criteria at unstructured granularity take the bounded-memory path (no score or mask
# tensors); the others rank through score tensors and keep-masks.
_IN_PLACE = frozenset({"l1", "l2", "lp"})


class WeightPruner:
    """Zeroes the lowest-ranked weights of every convolution and linear layer."""

    format: ClassVar[str] = "pt2"
    granularities: ClassVar[frozenset[str]] = WEIGHT_GRANULARITIES

    def preflight(self, spec: PruningSpec, layers: Mapping[str, int]) -> None:
        allocate(spec, layers)

    def round_spec(self, spec: PruningSpec, before: float, after: float) -> PruningSpec:
        # Zeroed weights rank lowest, so each round ranks the whole layer again at the absolute
        # ratio reached so far: the rounds are nested.
        return at_fraction(spec, after)

    def prune(
        self, model: Program, info: ModelInfo, spec: PruningSpec, ctx: PruneContext
    ) -> PruneOutcome:
        state = model.state_dict
        allocation = allocate(spec, {layer.name: layer.params for layer in info.prunable_layers})
        scored = {n: state[f"{n}.weight"] for n in [*allocation.per_layer, *allocation.global_pool]}
        layouts = {layer.name: layer.reduction_dim for layer in info.prunable_layers}
        planned = _zero_lowest(spec, scored, allocation, layouts, apply=not ctx.dry_run)
        layers = []
        for layer in info.prunable_layers:
            weight = state[f"{layer.name}.weight"]
            nonzero = int(weight.count_nonzero())
            if ctx.dry_run and layer.name in planned:
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
            if ctx.dry_run
            else 0
        )
        parameters = distinct_tensors(model.parameters())  # a tied weight once
        return PruneOutcome(
            model=model,
            layers=tuple(layers),
            params_after=sum(p.numel() for p in parameters),
            nonzero_params_after=sum(int(p.count_nonzero()) for p in parameters) - zeroed_by_plan,
            sparse_size_bytes=sparse_size_bytes(
                state, (f"{layer.name}.weight" for layer in info.prunable_layers)
            ),
            excluded=allocation.excluded,
        )

    def hold_zeros(self, model: Program, info: ModelInfo) -> Callable[[Program], None]:
        state = model.state_dict
        keep = {
            f"{layer.name}.weight": state[f"{layer.name}.weight"] != 0
            for layer in info.prunable_layers
        }

        def restore(program: Program) -> None:
            with torch.no_grad():
                for name, mask in keep.items():
                    weight = program.state_dict[name]
                    weight.mul_(mask.to(weight.dtype))

        return restore


def _zero_lowest(
    spec: PruningSpec,
    weights: dict[str, torch.Tensor],
    allocation: Allocation,
    layouts: dict[str, int],
    *,
    apply: bool,
) -> dict[str, int]:
    """Zero the lowest-ranked weights in place (when ``apply``); how many each layer loses."""
    if spec.granularity == "unstructured" and spec.criterion in _IN_PLACE:
        return prune_magnitude_in_place(weights, allocation, apply=apply)
    masks = weight_masks(spec, weights, allocation, layouts)
    if apply:
        with torch.no_grad():
            for name, keep in masks.items():
                weights[name].mul_(keep.to(weights[name].dtype))
    return {name: int((~keep).sum()) for name, keep in masks.items()}
