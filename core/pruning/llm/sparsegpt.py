"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and update its kept weights so its
outputs on the calibration data change as little as possible.

From the Hessian ``H = 2 X X^T`` of the layer's inputs (dampened by 1% of its mean diagonal), the
upper Cholesky factor of ``H^-1`` drives an OBS sweep over the input columns: in each block of
128 columns the mask is chosen on the weights as updated so far (adaptive mask selection, score
``w^2 / [H^-1]_jj^2``), and every pruned weight's error is spread over the columns after it.
With n:m the mask is chosen per run of ``m`` columns instead.

The sweep is organised for speed, not a different result: each block is held transposed (a
column of ``W`` is a contiguous row), its columns are taken in runs of ``STEP``, each column
updated by the runs' earlier columns with one small product (left-looking) and the rest of the
block by one product per run. The Hessian, and the factor of ``H^-1`` that overwrites it, are
held as their upper triangles in row panels of one block each (:mod:`.panels`): half the
square's bytes, and each block's rows of the factor are one panel. Given the same Hessian, the
masks are those of the column-by-column form and the weights equal up to float32 rounding
(``tests/core/test_llm_pruning.py``).

Two choices differ from the reference code, both for exact counts: each block removes exactly
``round(s x rows x columns)`` weights (the reference thresholds with ``<=``, which can take
more on ties), and weights that are zero already are always in the mask (so rounds nest and
held zeros stay zero). Columns whose input is always zero keep their weights (the reference
zeroes them, which would remove more than asked).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from core.allocation import removal_count
from core.pruning.llm.panels import PANEL, UpperPanels, invert_factor_

BLOCK = PANEL
DAMPING = 0.01
# Columns of a block taken one by one before one product updates the rest of the block.
STEP = 16
# Intra-op threads of the work inside a block (thousands of small ops per linear); the product
# that updates the columns after the block keeps the caller's count. On a CPU shared with other
# processes each small op split over threads waits for whichever thread was preempted. One
# 2,048 x 5,632 sweep on 2 cores, three busy processes beside it: 2.2-2.5 s all on 1 thread,
# 4.6-4.9 s all on 2, 2.6-2.9 s so split; alone on the machine 1.1-1.3, 0.74-0.78 and 0.80 s.
BLOCK_THREADS = 1


@dataclass(frozen=True)
class InverseHessian:
    """What the OBS sweep needs of a Hessian, held in the Hessian's own panels.

    ``u`` is the upper Cholesky factor of the dampened ``H^-1`` (it overwrote the ``X X^T`` it
    was factored from); ``damping`` is the value added to the diagonal and ``dead`` marks the
    inputs that were always zero (their diagonal set to 1 before dampening): with them the error
    of a sweep on the undampened Hessian follows from the sweep itself (:func:`sweep`).
    """

    u: UpperPanels
    damping: float
    dead: torch.Tensor


def inverse_hessian_(xxt: UpperPanels, damping: float = DAMPING) -> InverseHessian:
    """Factor ``xxt`` (float32, its upper triangle in panels) in place into
    :class:`InverseHessian`: the Hessian of a wide linear is the largest allocation of the
    whole prune, and no second one is made."""
    if xxt.flat.dtype != torch.float32:
        raise ValueError(f"xxt must be float32, got {xxt.flat.dtype}")
    blocks = xxt.diagonal_blocks()
    dead = torch.cat([block.diagonal() == 0 for block in blocks])
    total = 0.0
    for block in blocks:
        diag = block.diagonal()
        diag[diag == 0] = 1.0  # an input that is always zero: its column is decoupled
        total += float(diag.sum(dtype=torch.float64))
    value = damping * total / xxt.n
    for block in blocks:
        block.diagonal().add_(value)
    invert_factor_(xxt)
    return InverseHessian(xxt, value, dead)


def _block_mask(
    w: torch.Tensor, hinv_diag: torch.Tensor, frozen: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Prune-mask (True = remove) of one block: the ``round(s x numel)`` lowest OBS scores,
    plus every weight already zero."""
    scores = (w.square() / hinv_diag.square().unsqueeze(0)).masked_fill(frozen, -1.0)
    k = removal_count(sparsity, scores.numel())
    mask = frozen.flatten()  # a copy: the block is a column slice
    if k:
        # The k-th lowest score by selection (a quarter of topk's time at k = numel / 2), then
        # every score below it and, of the scores equal to it, the first ones in row order.
        flat = scores.flatten()
        threshold = torch.kthvalue(flat, k).values
        below = flat < threshold
        mask |= below
        ties = torch.nonzero(flat == threshold).squeeze(1)[: k - int(below.sum())]
        mask[ties] = True
    return mask.reshape(frozen.shape)


def _run_mask(
    w: torch.Tensor, hinv_diag: torch.Tensor, frozen: torch.Tensor, n: int, m: int
) -> torch.Tensor:
    """Prune-mask of a run of (at most) ``m`` columns: keep the ``n`` highest OBS scores of each
    row (``ceil(n x len / m)`` of a shorter run); weights already zero rank lowest."""
    scores = (w.square() / hinv_diag.square().unsqueeze(0)).masked_fill(frozen, -1.0)
    width = scores.shape[1]
    keep = min(width, -(-n * width // m))
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.topk(scores, keep, dim=1).indices, False)
    return mask


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    xxt: torch.Tensor,
    sparsity: float,
    *,
    n_m: tuple[int, int] | None = None,
    block: int = BLOCK,
    damping: float = DAMPING,
) -> torch.Tensor:
    """The pruned and updated ``(out, in)`` weight (float32; ``weight`` and ``xxt`` are not
    changed).

    Args:
        weight: ``(out, in)``.
        xxt: ``X X^T`` of the layer's inputs over the calibration tokens, ``(in, in)``.
        sparsity: the share each block loses (ignored with ``n_m``).
        n_m: keep ``n`` of every ``m`` consecutive input columns instead.
        block: columns per block of the lazy batch updates (a multiple of ``m`` is used).
        damping: added to the diagonal, as a share of its mean.

    Example:
        >>> w = torch.randn(8, 32); x = torch.randn(32, 100)
        >>> (sparsegpt(w, x @ x.T, 0.5) == 0).sum().item()
        128
    """
    hinv = inverse_hessian_(UpperPanels.from_lower(xxt), damping)
    w = weight.to(torch.float32, copy=True)
    sweep(w, hinv, sparsity, n_m=n_m, block=block)
    return w


@torch.no_grad()
def sweep(
    w: torch.Tensor,
    hinv: InverseHessian,
    sparsity: float,
    *,
    n_m: tuple[int, int] | None = None,
    block: int = BLOCK,
) -> float:
    """Prune and update the float32 ``(out, in)`` matrix ``w`` in place; returns the sum of the
    squared OBS errors, ``||(W - W')X||^2`` on the dampened Hessian.

    With ``E`` the errors of every column, ``W - W' = E U`` and ``U H Uᵀ = I``, so that error is
    ``||E||^2``: no Hessian is needed to report it (see :func:`error_on_data`).
    """
    rows, cols = w.shape
    u = hinv.u
    # Where w has no zeros (a dense model, the usual case), no (out, in) mask of them is held.
    frozen_all = w == 0 if int(torch.count_nonzero(w)) < w.numel() else None
    total = 0.0
    if n_m is not None:
        block = max(1, block // n_m[1]) * n_m[1]
    step = _step(block, n_m)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        frozen = (
            frozen_all[:, i1:i2]
            if frozen_all is not None
            else torch.zeros(rows, i2 - i1, dtype=torch.bool, device=w.device)
        )
        u_rows = u.rows(i1, i2)  # U[i1:i2, i1:]
        with _threads(BLOCK_THREADS):
            err1 = _block(w, u_rows[:, : i2 - i1], frozen, sparsity, n_m, i1, i2, step)
        # In place: ``w[:, i2:] -= err1 @ ...`` would hold a product nearly the size of ``w``.
        w[:, i2:].addmm_(err1.t(), u_rows[:, i2 - i1 :], alpha=-1.0)
        total += _sum_of_squares(err1)
    return total


def _block(
    w: torch.Tensor,
    u_block: torch.Tensor,
    frozen: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None,
    i1: int,
    i2: int,
    step: int,
) -> torch.Tensor:
    """Prune and update columns ``i1:i2`` of ``w`` in place (``u_block``: ``U[i1:i2, i1:i2]``);
    returns their errors, transposed (``(B, out)``)."""
    hinv1 = u_block.contiguous()  # (B, B)
    diag = torch.diagonal(hinv1)
    # The block transposed, (B, out): each column of w a contiguous row.
    w1 = w[:, i1:i2].t().contiguous()
    err1 = torch.zeros_like(w1)
    if n_m is None:
        # Chosen on the (out, B) block before its loop; equal scores are taken in row order.
        mask1 = _block_mask(w1.t(), diag, frozen, sparsity).t().contiguous()
    else:
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
    for j1 in range(0, i2 - i1, step):
        j2 = min(j1 + step, i2 - i1)
        _columns(w1, err1, mask1, hinv1, diag, frozen, j1, j2, n_m)
        # The rest of the block at once, then the next run of columns.
        w1[j2:].addmm_(hinv1[j1:j2, j2:].t(), err1[j1:j2], alpha=-1.0)
    w[:, i1:i2] = w1.t()
    return err1


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """At most ``count`` intra-op threads inside the block (the caller's count restored after)."""
    threads = torch.get_num_threads()
    if threads <= count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _step(block: int, n_m: tuple[int, int] | None) -> int:
    """Columns updated one by one before the rest of the block is updated by one product: a
    multiple of ``m`` (an n:m run is chosen on columns that every column before it updated)."""
    m = 1 if n_m is None else n_m[1]
    return min(block, max(1, STEP // m) * m)


def _columns(
    w1: torch.Tensor,
    err1: torch.Tensor,
    mask1: torch.Tensor,
    hinv1: torch.Tensor,
    diag: torch.Tensor,
    frozen: torch.Tensor,
    j1: int,
    j2: int,
    n_m: tuple[int, int] | None,
) -> None:
    """Columns ``j1:j2`` of a transposed block (``w1``, ``err1``, ``mask1``: ``(B, out)``), one
    at a time, each first updated by the errors of the columns before it in ``j1:j2`` (the
    columns before ``j1`` updated it already).

    Left-looking: each column is one ``out``-long vector and one small product, not a rank-one
    update of the rest of the block: at 5,632 rows that update is ~10^5 elements per column, an
    op torch splits over threads, and on a busy CPU every such split waits on a preempted thread.
    """
    for i in range(j1, j2):
        if n_m is not None and (i - j1) % n_m[1] == 0:
            j = min(i + n_m[1], j2)
            run = w1[i:j]
            if i > j1:
                run = torch.addmm(run, hinv1[j1:i, i:j].t(), err1[j1:i], alpha=-1.0)
            mask1[i:j] = _run_mask(run.t(), diag[i:j], frozen[:, i:j], *n_m).t()
        col = w1[i]
        if i > j1:
            col = torch.addmv(col, err1[j1:i].t(), hinv1[j1:i, i], alpha=-1.0)
        q = col.masked_fill(mask1[i], 0.0)
        err1[i] = (col - q) / diag[i]
        w1[i] = q


def _sum_of_squares(matrix: torch.Tensor) -> float:
    """The sum of the squares of a float32 matrix's entries: each row's in float32, the rows'
    in float64. Not ``square().sum(dtype=torch.float64)``, whose float64 cast of the whole
    matrix kept ~10 MiB resident per call at the 1 B widths (+35 MiB in ``error_on_data``)."""
    return float(torch.linalg.vector_norm(matrix, dim=1).to(torch.float64).square().sum())


def error_on_data(
    before: torch.Tensor,
    after: torch.Tensor,
    hinv: InverseHessian,
    swept: float,
    *,
    rows: int = 256,
) -> float:
    """``||(W - W')X||_F^2`` on the undampened Hessian, from ``swept`` (what :func:`sweep`
    returned for ``before`` -> ``after``): the dampened Hessian adds ``damping`` to every
    diagonal entry and ``1 + damping`` to a dead input's, whose true diagonal is 0.

    ``after`` is the sweep's float32 result: a model stored in a narrower dtype adds its
    rounding, which this does not count (it would need the Hessian the factorisation
    overwrote). Rows are taken ``rows`` at a time into one buffer, reused: no ``(out, in)``
    temporary, and no new allocation per chunk (at the 1 B widths, fresh ones per chunk raised
    the prune's peak by ~35 MiB, the heap reusing pages given back before the sweep).
    """
    damped = 0.0
    dead = 0.0
    any_dead = bool(hinv.dead.any())
    buffer = torch.empty(
        min(rows, before.shape[0]), before.shape[1], dtype=torch.float32, device=before.device
    )
    for start in range(0, before.shape[0], rows):
        stop = min(start + rows, before.shape[0])
        delta = buffer[: stop - start]
        torch.sub(before[start:stop], after[start:stop], out=delta)
        damped += _sum_of_squares(delta)
        if any_dead:
            dead += _sum_of_squares(delta[:, hinv.dead])
    return max(0.0, swept - hinv.damping * damped - dead)


def reconstruction_error(
    before: torch.Tensor, after: torch.Tensor, xxt: torch.Tensor, *, rows: int = 256
) -> float:
    """``||(W - W')X||_F^2``: the squared error the change adds to the layer's outputs, summed
    over the calibration tokens ``X`` (from ``X X^T``, of which only the lower triangle is read:
    all :class:`~core.pruning.llm.masks.Hessian` keeps).

    Computed ``rows`` output rows at a time in float32 (summed in float64), so it needs no
    float64 copy of the Hessian and no full ``(out, in)`` temporaries.
    """
    h = torch.tril(xxt).to(torch.float32)
    h += torch.tril(h, -1).mT
    total = 0.0
    for start in range(0, before.shape[0], rows):
        delta = before[start : start + rows].to(torch.float32) - after[start : start + rows].to(
            torch.float32
        )
        total += float(((delta @ h) * delta).sum(dtype=torch.float64))
    return total
