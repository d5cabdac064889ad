"""Channel and head pruning of ``torch.export`` programs: whole channels (heads) removed with
everything coupled to them, and the smaller program exported again (see :mod:`core.structure`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch

from core.allocation import check_patterns
from core.criteria import STRUCTURED_GRANULARITIES
from core.formats.base import ModelInfo
from core.metrics import distinct_tensors, sparse_size_bytes
from core.pruning.base import LayerResult, PruneContext, PruneOutcome
from core.schedule import relative_step
from core.spec import PruningSpec
from core.structure import prune_program

Program = torch.export.ExportedProgram


class ChannelPruner:
    """Removes the lowest-ranked channels (or heads) of every dependency group."""

    format: ClassVar[str] = "pt2"
    granularities: ClassVar[frozenset[str]] = STRUCTURED_GRANULARITIES

    def preflight(self, spec: PruningSpec, layers: Mapping[str, int]) -> None:
        # Group sizes, and so the caps of a global ratio, need the graph: only the globs can be
        # checked from metadata. The worker's allocator checks the rest on the real groups.
        check_patterns(spec, list(layers))

    def round_spec(self, spec: PruningSpec, before: float, after: float) -> PruningSpec:
        # Each round shrinks the program, so its ratio is of what is left.
        return relative_step(spec, before, after)

    def prune(
        self, model: Program, info: ModelInfo, spec: PruningSpec, ctx: PruneContext
    ) -> PruneOutcome:
        """One step; the dry run writes the pre-flight report (every group, what it would lose,
        what is blocked and why) and prunes nothing."""
        structured = prune_program(model, spec, dry_run=ctx.dry_run, calibration=ctx.calibration)
        pruned = structured.program
        state = pruned.state_dict
        layers = []
        for layer in info.prunable_layers:
            name = f"{layer.name}.weight"
            if ctx.dry_run:
                shape = structured.shapes.get(name, layer.shape)
                nonzero = structured.nonzero.get(name, int(model.state_dict[name].count_nonzero()))
            else:
                shape = tuple(state[name].shape)
                nonzero = int(state[name].count_nonzero())
            layers.append(
                LayerResult(
                    name=layer.name,
                    kind=layer.kind,
                    shape_before=layer.shape,
                    shape_after=tuple(shape),
                    params=math.prod(shape),
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / max(layer.params, 1),
                )
            )
        parameter_names = {name for name, _ in model.named_parameters()}
        removed = sum(
            model.state_dict[name].numel() - math.prod(shape)
            for name, shape in structured.shapes.items()
            if name in parameter_names
        )
        # A tied weight (GPT-2's wte and lm_head) is listed under each name: counted once.
        parameters = distinct_tensors(pruned.parameters())
        params_after = sum(p.numel() for p in parameters) - (removed if ctx.dry_run else 0)
        nonzero_after = (
            params_after if ctx.dry_run else sum(int(p.count_nonzero()) for p in parameters)
        )
        excluded = tuple(
            name
            for d in structured.plan.decisions
            if d.skipped == "excluded"
            for name in d.group.layers
        )
        return PruneOutcome(
            model=pruned,
            layers=tuple(layers),
            params_after=params_after,
            nonzero_params_after=nonzero_after,
            sparse_size_bytes=sparse_size_bytes(
                state, (f"{layer.name}.weight" for layer in info.prunable_layers)
            ),
            excluded=excluded,
            kept_out=structured.kept_out,
            kept_in=structured.kept_in,
            details={"groups": structured.report()},
        )

    def hold_zeros(self, model: Program, info: ModelInfo) -> Callable[[Program], None]:
        # Removed channels are gone, not masked: nothing to hold between rounds.
        return lambda program: None
