"""Keep-masks of language-model linears, ranked within each output row (magnitude, Wanda) or in
runs of ``m`` input features (n:m), plus the statistics Wanda and SparseGPT collect per layer.

Weights that are zero already rank below every other weight, so pruning again at a higher ratio
keeps the earlier zeros (rounds are nested) and the counts stay exact.
"""

from __future__ import annotations

import torch
from torch import nn

from core.allocation import removal_count
from core.masks import nm_mask, nm_removed
from core.pruning.llm.panels import UpperPanels
from core.unstructured import kth_lowest

# Rows handled at a time: tokens converted to float32 inside the hooks (no statistic holds a
# wider copy of a whole batch of activations), weight rows ranked by ``row_mask``.
CHUNK_ROWS = 1024


def ranked_(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``scores``, in place, with the positions where ``weight`` is already zero ranked lowest
    of all. A ``weight`` with no zero (nearly always) costs one pass and no mask."""
    if not bool(weight.all()):
        scores.masked_fill_(weight == 0, -1.0)
    return scores


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
    selection (:func:`kth_lowest`) and every score up to it; a row where another score equals
    it (or that holds a NaN) is ranked by a stable sort."""
    threshold = kth_lowest(scores, k)
    removed = scores <= threshold
    ties = torch.nonzero(removed.sum(dim=1) != k).squeeze(1)
    if ties.numel():
        lowest = torch.sort(scores[ties], dim=1, stable=True).indices[:, :k]
        exact = torch.zeros_like(removed[ties]).scatter_(1, lowest, True)
        removed[ties] = exact
    return removed.logical_not_()


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
        self.add(self.terms(inputs[0]))

    @staticmethod
    def terms(x: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """What ``x`` adds: each chunk's squared feature norms (float64) and its token count,
        in the order they are summed (so linears that read the same input can share them)."""
        # Squares summed, not ``vector_norm(dim=0) ** 2``: on one thread 2-5x faster on a
        # (512, 2,048-5,632) chunk, and 5-10x closer to the float64 sum (1-2e-7 against 1-1.5e-6).
        return [(c.square().sum(dim=0).to(torch.float64), int(c.shape[0])) for c in _rows(x)]

    def add(self, terms: list[tuple[torch.Tensor, int]]) -> None:
        for sum_sq, tokens in terms:
            self.sum_sq += sum_sq
            self.tokens += tokens


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
