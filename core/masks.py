"""Keep-masks at weight granularities that zero weights in place: unstructured, n:m, block.

Example::

    from core.allocation import allocate
    from core.masks import weight_masks
    from core.spec import PruningSpec

    spec = PruningSpec(criterion="l1", granularity="n:m", n_m=(2, 4))
    weights = {"fc": torch.randn(8, 16)}
    keep = weight_masks(spec, weights, allocate(spec, {"fc": 128}))["fc"]  # 2 of every 4 kept
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.nn import functional as F

from core.allocation import Allocation, Unit, allocate_units
from core.importance import element_scores
from core.spec import PruningSpec
from core.unstructured import unstructured_masks


def weight_masks(
    spec: PruningSpec,
    weights: Mapping[str, torch.Tensor],
    allocation: Allocation,
    reduction_dims: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Bool keep-mask (each weight's shape) for every layer ``allocation`` prunes.

    ``weights`` maps a layer name to its weight; excluded layers get no mask. A weight whose
    input channels are dim 0 (``reduction_dims``: a matrix product's (in, out) weight, GPT-2's
    Conv1D) is ranked as its (out, in) transpose, so n:m runs and blocks lie as for ``linear``.
    """
    names = [*allocation.per_layer, *allocation.global_pool]
    flipped = {n for n in names if (reduction_dims or {}).get(n, 1) == 0 and weights[n].dim() == 2}
    scores = {n: ranked_scores(spec, n, weights[n], 0 if n in flipped else 1) for n in names}
    masks = _MASKERS[spec.granularity](spec, scores, allocation)
    return {n: m.T if n in flipped else m for n, m in masks.items()}


def _reduction_last(t: torch.Tensor) -> torch.Tensor:
    """(out, in, *kernel) -> (out, *kernel, in): input channels last, as N:M kernels read them."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive weights along the input channels.

    A trailing run shorter than ``m`` (input channels not a multiple of ``m``) keeps
    ``ceil(n * len / m)`` of its weights, so no run holds more zeros than N:M allows.
    """
    s = _reduction_last(scores)
    length = s.shape[-1]
    full = length - length % m
    keep = torch.zeros_like(s, dtype=torch.bool)
    if full:
        runs = s[..., :full].reshape(-1, m)
        kept = _lane_top(runs, n) if m <= LANE_RANK_MAX_M else _topk_runs(runs, n)
        keep[..., :full] = kept.reshape(*s.shape[:-1], full)
    if full < length:
        tail = s[..., full:]
        k = min(tail.shape[-1], -(-n * tail.shape[-1] // m))
        top = tail.topk(k, dim=-1).indices
        keep[..., full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(-1, top, True)
    return keep.movedim(-1, 1) if scores.dim() > 2 else keep


# Runs of up to this many are ranked lane by lane (:func:`_lane_top`); longer ones by ``topk``.
LANE_RANK_MAX_M = 4


def _lane_top(runs: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask of the ``n`` highest of each row of ``runs`` (``(k, m)``, small ``m``), ties to
    the earlier position. Each position's rank is counted from the ``m (m - 1) / 2`` pairwise
    comparisons of whole columns, one contiguous vector each: ``topk`` over millions of
    4-long rows took 14 ms per million scores on one thread, this about a third."""
    lanes = runs.t().contiguous()  # (m, k): lane j is position j of every run
    lanes.nan_to_num_(nan=torch.inf)  # NaN ranks highest, as in topk (the copy is ours)
    ranks = torch.zeros(lanes.shape, dtype=torch.uint8, device=lanes.device)
    for i in range(lanes.shape[0]):
        for j in range(i + 1, lanes.shape[0]):
            ahead = lanes[i] >= lanes[j]  # i is earlier: a tie goes to it
            ranks[j] += ahead
            ranks[i] += ~ahead
    return (ranks < n).t()


def _topk_runs(runs: torch.Tensor, n: int) -> torch.Tensor:
    top = runs.topk(n, dim=-1).indices  # exactly n per run, ties broken by topk
    return torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, top, True)


def nm_removed(length: int, n: int, m: int) -> int:
    """How many of a run of ``length`` weights along the input channels :func:`nm_mask` zeroes:
    ``m - n`` of every full run of ``m``, and of a shorter trailing run all but
    ``ceil(n * tail / m)``."""
    full, tail = divmod(length, m)
    return full * (m - n) + tail - min(tail, -(-n * tail // m))


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def nm_masks(
    spec: PruningSpec, scores: Mapping[str, torch.Tensor], allocation: Allocation
) -> dict[str, torch.Tensor]:
    """N:M keep-masks of every layer ``allocation`` prunes (a fixed pattern: no ranking pools).
    A layer whose ``layer_sparsity`` is 0 gets no mask: 0 leaves a layer dense, as at every
    other granularity."""
    assert spec.n_m is not None  # the spec's validator fills it in
    pruned = [n for n, ratio in allocation.per_layer.items() if ratio > 0]
    return {n: nm_mask(scores[n], *spec.n_m) for n in [*pruned, *allocation.global_pool]}


def block_tiles(block: tuple[int, int], scores: torch.Tensor) -> torch.Tensor:
    """Each ``block`` tile's score (tile rows x tile columns of ``scores`` seen as
    ``out x in*kernel``): its mean element score, so edge tiles (smaller where a dimension is not
    a multiple of the block) compete fairly."""
    return F.avg_pool2d(_as_matrix(scores).unsqueeze(0), block, ceil_mode=True).squeeze(0)


def block_sizes(block: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """How many weights each tile of :func:`block_tiles` holds (edge tiles hold fewer)."""
    ones = _as_matrix(torch.ones(shape)).unsqueeze(0)
    return F.avg_pool2d(ones, block, ceil_mode=True, divisor_override=1).squeeze(0).round().long()


def ranked_scores(
    spec: PruningSpec, name: str, weight: torch.Tensor, reduction_dim: int = 1
) -> torch.Tensor:
    """``weight``'s element scores in the layout the maskers rank: a 2-D weight whose input
    channels are dim 0 as its (out, in) transpose."""
    scores = element_scores(name, weight, spec)
    return scores.T if reduction_dim == 0 and weight.dim() == 2 else scores


def block_masks(
    spec: PruningSpec, scores: Mapping[str, torch.Tensor], allocation: Allocation | None = None
) -> dict[str, torch.Tensor]:
    """Remove whole ``block``-shaped tiles of each weight (seen as ``out x in*kernel``), ranked
    by :func:`block_tiles`. Each ranking pool of N blocks loses round(s x N)."""
    assert spec.block is not None  # the spec's validator fills it in
    bh, bw = spec.block
    tiles = {name: block_tiles((bh, bw), s) for name, s in scores.items()}
    # Pools of blocks instead of weights; the globs are checked against every layer, excluded
    # ones included (they have no scores here, and an ``exclude`` naming them is no typo).
    excluded = allocation.excluded if allocation is not None else ()
    allocation = allocate_units(
        spec,
        [Unit(n, t.numel(), (n,)) for n, t in tiles.items()],
        item="blocks",
        layer_names=[*tiles, *excluded],
    )
    tile_keep = unstructured_masks(tiles, allocation)
    masks: dict[str, torch.Tensor] = {}
    for name, keep in tile_keep.items():
        rows, cols = _as_matrix(scores[name]).shape
        full = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
        masks[name] = full.reshape(scores[name].shape)
    return masks


Masker = Callable[[PruningSpec, Mapping[str, torch.Tensor], Allocation], dict[str, torch.Tensor]]
# One keep-mask builder per weight granularity.
_MASKERS: dict[str, Masker] = {
    "unstructured": lambda spec, scores, allocation: unstructured_masks(scores, allocation),
    "n:m": nm_masks,
    "block": block_masks,
}
