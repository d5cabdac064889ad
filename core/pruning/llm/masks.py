"""Keep-masks of language-model linears, ranked within each output row (magnitude, Wanda) or in
runs of ``m`` input features (n:m), plus the statistics Wanda and SparseGPT collect per layer.

Weights that are zero already rank below every other weight, so pruning again at a higher ratio
keeps the earlier zeros (rounds are nested) and the counts stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.allocation import removal_count
from core.masks import nm_mask, nm_removed
from core.pruning.llm.panels import UpperPanels

# Rows handled at a time: tokens converted to float32 inside the hooks (no statistic holds a
# wider copy of a whole batch of activations), weight rows ranked by ``row_mask``.
CHUNK_ROWS = 1024
# Values sampled by ``kth_lowest`` to bracket the one it selects; inputs up to 16 times this
# many are selected among directly (there the bracket's passes cost what the selection does).
SELECT_SAMPLE = 4096
# How far, in standard deviations of a random sample's rank, the bracket reaches either side.
SELECT_SPREAD = 4.0


def ranked(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``scores`` with the positions where ``weight`` is already zero ranked lowest of all."""
    return scores.masked_fill(weight == 0, -1.0)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes the ``round(sparsity x in)`` lowest scores of every row.

    Ties go to the earlier column (as a stable sort orders them, as in the Wanda reference code).
    """
    k = removal_count(sparsity, scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        # A few rows at a time: the selection's copy of a whole wide layer would be its size.
        for start in range(0, scores.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            keep[rows] = _row_keep(scores[rows], k)
    return keep


def _row_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``scores`` without the ``k`` lowest of each row: each row's k-th lowest by
    selection and every score up to it (a quarter of a sort's time at 2,048-5,632 columns); a
    row where another score equals it (or that holds a NaN) is ranked by a stable sort."""
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    removed = scores <= threshold
    ties = torch.nonzero(removed.sum(dim=1) != k).squeeze(1)
    if ties.numel():
        lowest = torch.sort(scores[ties], dim=1, stable=True).indices[:, :k]
        exact = torch.zeros_like(removed[ties]).scatter_(1, lowest, True)
        removed[ties] = exact
    return ~removed


def kth_lowest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The ``k``-th lowest of the 1-D float ``values`` (1-based; NaN ranks highest, as in
    ``torch.kthvalue``) and how many values are at most it.

    ``torch.kthvalue`` copies and selects among every value (7 ms for 720 K floats on one
    thread). A systematic sample brackets the answer first, and the selection runs among the
    few values inside the bracket: about a third of the time, the same value. A bracket that
    misses (the sample unlike the rest) falls back to the full selection.
    """
    found = _bracketed_kth(values, k)
    if found is not None:
        return found
    threshold = torch.kthvalue(values, k).values
    return threshold, int(torch.count_nonzero(values <= threshold))


def _bracketed_kth(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int] | None:
    """:func:`kth_lowest` selected inside a bracket drawn from a sample, or None where the
    input is small, ``k`` lies near its top, or the bracket does not hold the answer."""
    n = values.numel()
    if n <= 16 * SELECT_SAMPLE:
        return None
    sample = values[:: n // SELECT_SAMPLE]
    size = sample.numel()
    share = k / n
    spread = SELECT_SPREAD * math.sqrt(size * share * (1.0 - share)) + 2.0
    low, high = math.floor(share * size - spread), math.ceil(share * size + spread)
    if high > size:
        # No upper bound would let NaN into the bracket, where it no longer ranks highest.
        return None
    inside = values <= torch.kthvalue(sample, high).values  # NaN: never inside
    below = 0
    if low >= 1:
        lower = values < torch.kthvalue(sample, low).values
        below = int(torch.count_nonzero(lower))
        inside.logical_and_(lower.logical_not_())
    candidates = values[inside]
    if not below < k <= below + candidates.numel():
        return None
    threshold = torch.kthvalue(candidates, k - below).values
    return threshold, below + int(torch.count_nonzero(candidates <= threshold))


def keep_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Row-wise keep-mask at ``sparsity``, or n:m along the input features when ``n_m``."""
    return nm_mask(scores, *n_m) if n_m is not None else row_mask(scores, sparsity)


def planned_removals(
    shape: tuple[int, int], sparsity: float, n_m: tuple[int, int] | None, *, block: int | None
) -> int:
    """How many weights of an ``(out, in)`` layer with no zeros yet a pruning step removes:
    row-wise (``block`` None), per block of ``block`` input columns (SparseGPT), or n:m."""
    rows, cols = shape
    if n_m is not None:
        return rows * nm_removed(cols, *n_m)
    if block is None:
        return rows * removal_count(sparsity, cols)
    return sum(
        removal_count(sparsity, rows * (min(start + block, cols) - start))
        for start in range(0, cols, block)
    )


def _rows(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` as ``(tokens, in)`` float32 chunks of at most ``CHUNK_ROWS`` rows (no copy when
    ``x`` is float32 already)."""
    flat = x.detach().reshape(-1, x.shape[-1])
    return [chunk.to(torch.float32) for chunk in torch.split(flat, CHUNK_ROWS)]


class FeatureNorms:
    """Forward hook accumulating the squared L2 norm of every input feature of a linear over all
    tokens it sees (Wanda's ``||X_j||_2^2``): each chunk summed in float32, the running total in
    float64 so the number of batches does not matter."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        for x in _rows(inputs[0]):
            self.sum_sq += torch.linalg.vector_norm(x, dim=0).square().to(torch.float64)
            self.tokens += int(x.shape[0])


class Hessian:
    """Forward hook accumulating ``X X^T`` (``(in, in)``, float32) over all tokens a linear sees;
    SparseGPT's Hessian is ``2 X X^T`` up to a scale that does not change its result.

    Only the upper triangle is kept, in row panels (:class:`~core.pruning.llm.panels.
    UpperPanels`, about half the bytes of the square), and only it is computed: about half the
    products of the full ``X X^T``.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.xxt = UpperPanels.zeros(in_features, device)
        self.tokens = 0

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        for x in _rows(inputs[0]):
            self.xxt.add_gram_(x)
            self.tokens += int(x.shape[0])
