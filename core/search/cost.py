"""What a choice of per-unit ratios costs, predicted without pruning: MACs and parameters.

Each tensor the pruning shrinks is described by its dense shape and, per dimension, how many
entries each unit's removed item takes away there (one output channel of a group takes one row of
its convolutions, one column of the next layer, one entry of its norm). A tensor's size after is
then the product of its shrunk dimensions, and a convolution's or linear layer's MACs scale with
its weight's size (its output positions do not change). Exact for slicing, which is linear in the
removed items; the allocation budgets with it and the job measures the real program after.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.allocation import removal_count


@dataclass(frozen=True)
class TensorCost:
    """One tensor: its dense shape, the MACs per entry of it (0 for what no matmul reads), whether
    it is a parameter, and ``shrink[dim][unit]``: entries of ``dim`` one removed item takes."""

    shape: tuple[int, ...]
    macs_per_entry: float = 0.0
    parameter: bool = True
    shrink: dict[int, dict[str, float]] = field(default_factory=dict)

    def entries(self, removed: Mapping[str, float]) -> float:
        dims = [
            max(size - sum(c * removed.get(u, 0.0) for u, c in self.shrink.get(d, {}).items()), 0.0)
            for d, size in enumerate(self.shape)
        ]
        return math.prod(dims)


@dataclass(frozen=True)
class CostModel:
    """MACs and parameters as functions of the units' ratios (unit key -> fraction removed).

    ``sizes`` are the items of each unit; ``fixed`` the MACs and parameters no unit touches.
    ``reduces``: what pruning lowers (weights zeroed in place still cost MACs on dense kernels,
    so there only ``params``, the nonzero ones, fall). ``levels``: the only ratios above 0 a
    unit can take where its pattern is fixed (n:m: 1 - n/m); a unit absent takes any ratio.
    """

    tensors: dict[str, TensorCost]
    sizes: dict[str, int]
    fixed_macs: float = 0.0
    fixed_params: float = 0.0
    reduces: frozenset[str] = frozenset({"macs", "params"})
    levels: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def removed(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """Items each unit loses, rounded as the pruner rounds (one item always stays)."""
        return {
            u: float(min(removal_count(r, self.sizes[u]), self.sizes[u] - 1))
            for u, r in ratios.items()
            if u in self.sizes
        }

    def macs(self, ratios: Mapping[str, float]) -> float:
        removed = self.removed(ratios) if "macs" in self.reduces else {}
        return self.fixed_macs + sum(
            t.macs_per_entry * t.entries(removed) for t in self.tensors.values()
        )

    def params(self, ratios: Mapping[str, float]) -> float:
        removed = self.removed(ratios)
        return self.fixed_params + sum(
            t.entries(removed) for t in self.tensors.values() if t.parameter
        )

    def allows(self, ratios: Mapping[str, float]) -> bool:
        """Whether the pruner can build the model at ``ratios`` (every ratio can, here)."""
        return True

    def fraction(self, kind: str, ratios: Mapping[str, float]) -> float:
        """``kind`` (``macs`` or ``params``) at ``ratios``, as a fraction of the dense model."""
        measure = self.macs if kind == "macs" else self.params
        dense = measure({})
        return measure(ratios) / dense if dense else 1.0


@dataclass(frozen=True)
class PatternCost(CostModel):
    """Units that are either dense or at their one fixed pattern (n:m), which zeroes
    ``drops[unit]`` weights: ``fixed_params`` is the dense model's count, and only the nonzero
    parameters fall (zeros cost MACs on dense kernels)."""

    drops: dict[str, int] = field(default_factory=dict)

    def params(self, ratios: Mapping[str, float]) -> float:
        return self.fixed_params - sum(
            self.drops[u] for u, r in ratios.items() if r > 0 and u in self.drops
        )
