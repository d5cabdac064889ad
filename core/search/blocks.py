"""Scan units at ``block``: a layer of a ``pt2`` program is one unit, its blocks the items.

The allocation steps a layer one block at a time (``sizes``: blocks per layer), the scan prunes a
layer alone through the pruner's own masker, and the cost model counts the weights the pruner
zeroes: ``k`` blocks of a layer whose dimensions are multiples of the block are ``k`` whole
blocks; where edge blocks are smaller, which blocks go decides the count, so it is read off the
pruner's own ranking of that layer's blocks (once per count asked, then remembered).

Example::

    from core.search import open_scanner
    scanner = open_scanner(spec, "cnn.pt2", "digits.npz")   # granularity "block", a target
    scanner.cost_model().params({"stem": 0.5})              # nonzero weights left, exactly
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from core.formats.base import ModelInfo, PrunableLayer
from core.masks import block_sizes, block_tiles, ranked_scores
from core.search.cost import CostModel
from core.search.units import Calibration, ScanUnit, fixed_by_user
from core.search.weights import WeightUnits
from core.spec import PruningSpec
from core.unstructured import lowest_k_mask

Program = torch.export.ExportedProgram
_DEFAULT_BLOCK = (1, 4)  # the spec's validator fills it in; a bare spec may lack it


@dataclass(frozen=True)
class LayerBlocks:
    """One layer's blocks as the pruner ranks them: each block's score and weight count."""

    tiles: torch.Tensor
    sizes: torch.Tensor
    _zeroed: dict[int, int] = field(default_factory=dict, compare=False)

    def zeroed(self, k: int) -> int:
        """Weights zeroed when the pruner removes ``k`` blocks: its own ``lowest_k_mask`` picks
        them where their sizes differ (ties included)."""
        full = int(self.sizes.max())
        if bool((self.sizes == full).all()):
            return k * full
        if k not in self._zeroed:
            self._zeroed[k] = int(self.sizes[~lowest_k_mask(self.tiles, k)].sum())
        return self._zeroed[k]


@dataclass(frozen=True)
class BlockCost(CostModel):
    """The dense model's parameters less the weights the chosen blocks hold (zeros cost MACs
    on dense kernels, so only ``params`` falls)."""

    blocks: dict[str, LayerBlocks] = field(default_factory=dict)

    def params(self, ratios: Mapping[str, float]) -> float:
        removed = self.removed(ratios)
        return self.fixed_params - sum(self.blocks[u].zeroed(int(k)) for u, k in removed.items())


class BlockUnits(WeightUnits):
    """``pt2`` at ``block``: a layer is one unit of ``ceil(rows/bh) x ceil(cols/bw)`` blocks; a
    layer of a single block is no unit (the pruner always keeps one)."""

    granularities: ClassVar[frozenset[str]] = frozenset({"block"})

    def units(
        self, program: Program, info: ModelInfo, spec: PruningSpec, calibration: Calibration
    ) -> list[ScanUnit]:
        counts = {layer.name: _block_count(layer, spec) for layer in info.prunable_layers}
        return [
            ScanUnit(layer.name, (layer.name,), counts[layer.name])
            for layer in info.prunable_layers
            if not fixed_by_user(spec, (layer.name,)) and counts[layer.name] > 1
        ]

    def cost_model(
        self, program: Program, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        blocks = _layer_blocks(program, info, spec, names={u.key for u in units})
        return BlockCost(
            {},
            {u.key: u.size for u in units},
            fixed_params=float(sum(t.numel() for _, t in program.named_parameters())),
            reduces=frozenset({"params"}),
            blocks=blocks,
        )


def _block_count(layer: PrunableLayer, spec: PruningSpec) -> int:
    """Blocks of a layer's weight seen as the masker sees it (``out x in*kernel``; a 2-D weight
    whose input channels are dim 0 transposed first)."""
    bh, bw = spec.block or _DEFAULT_BLOCK
    shape = layer.shape
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    if len(shape) == 2 and layer.reduction_dim == 0:
        rows, cols = cols, rows
    return -(-rows // bh) * -(-cols // bw)


def _layer_blocks(
    program: Program, info: ModelInfo, spec: PruningSpec, names: set[str] | None
) -> dict[str, LayerBlocks]:
    """Each prunable layer's blocks (only ``names`` where given), scored as the pruner scores
    them: the criterion's element scores in the masker's layout, then :func:`block_tiles`."""
    block = spec.block or _DEFAULT_BLOCK
    state = program.state_dict
    out = {}
    for layer in info.prunable_layers:
        if names is not None and layer.name not in names:
            continue
        weight = state[f"{layer.name}.weight"]
        scores = ranked_scores(spec, layer.name, weight, layer.reduction_dim)
        out[layer.name] = LayerBlocks(
            block_tiles(block, scores), block_sizes(block, tuple(scores.shape))
        )
    return out
