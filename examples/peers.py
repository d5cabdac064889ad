"""Peers the tests and benchmarks compare Shears with, set up the same way in both."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def torch_pruning_global(
    model: nn.Module, head: str, target: float, steps: int = 12, keep: Sequence[str] = ()
) -> nn.Module:
    """Torch-Pruning's global channel ranking (``GroupMagnitudeImportance(p=2)``,
    ``global_pruning=True``, the ``head`` layer kept whole) at the ratio, bisected, that leaves at
    most ``target`` of the model's MACs on 1x8x8 inputs. Returns a pruned copy in eval mode.

    ``keep``: more layers whose output channels stay (a fused ``qkv`` chunked into heads, which
    Torch-Pruning cannot slice consistently and Shears' channel granularity leaves whole too)."""
    import torch_pruning as tp

    example = torch.randn(1, 1, 8, 8)
    dense, _ = tp.utils.count_ops_and_params(model, example)

    def pruned(ratio: float) -> nn.Module:
        copy_ = copy.deepcopy(model)
        tp.pruner.MetaPruner(
            copy_,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True,
            pruning_ratio=ratio,
            ignored_layers=[copy_.get_submodule(name) for name in (head, *keep)],
        ).step()
        return copy_.eval()

    lo, hi = 0.0, 0.95
    for _ in range(steps):
        mid = (lo + hi) / 2
        macs, _ = tp.utils.count_ops_and_params(pruned(mid), example)
        lo, hi = (mid, hi) if macs / dense > target else (lo, mid)
    return pruned(hi)


def macs_fraction(pruned: nn.Module, dense: nn.Module) -> float:
    """MACs of ``pruned`` over ``dense`` as Torch-Pruning counts them (1x8x8 inputs)."""
    import torch_pruning as tp

    example = torch.randn(1, 1, 8, 8)
    return float(
        tp.utils.count_ops_and_params(pruned, example)[0]
        / tp.utils.count_ops_and_params(dense, example)[0]
    )
