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
from core.unstructured import kth_lowest

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
    w1: torch.Tensor, hinv_diag: torch.Tensor, frozen: torch.Tensor | None, sparsity: float
) -> torch.Tensor:
    """Prune-mask (True = remove) of one transposed block (``w1``: ``(B, out)``, ``frozen``
    its already-zero weights or None): the ``round(s x numel)`` lowest OBS scores, plus every
    weight already zero."""
    scores = w1.square().div_(hinv_diag.square().unsqueeze(1))
    if frozen is not None:
        scores.masked_fill_(frozen, -1.0)
    k = removal_count(sparsity, scores.numel())
    if not k:
        return torch.zeros_like(w1, dtype=torch.bool) if frozen is None else frozen.clone()
    # The k-th lowest score by selection (a sort costs several times as much); with no other
    # score equal to it, the mask is every score up to it.
    threshold = kth_lowest(scores.flatten(), k)
    mask = scores <= threshold
    if int(torch.count_nonzero(mask)) > k:
        # Ties: of the scores equal to the threshold, the first ones in the (out, B) block's
        # row order.
        mask = scores < threshold
        ties = torch.nonzero((scores == threshold).t())[: k - int(mask.sum())]
        mask[ties[:, 1], ties[:, 0]] = True
    if frozen is not None:
        mask |= frozen
    return mask


def _run_mask(
    run: torch.Tensor, hinv_diag: torch.Tensor, frozen: torch.Tensor | None, n: int, m: int
) -> torch.Tensor:
    """Prune-mask of a transposed run of (at most) ``m`` columns (``run``: ``(len, out)``):
    keep the ``n`` highest OBS scores of each row of the weight (``ceil(n x len / m)`` of a
    shorter run); weights already zero rank lowest."""
    scores = run.t().square() / hinv_diag.square().unsqueeze(0)  # (out, len)
    if frozen is not None:
        scores.masked_fill_(frozen.t(), -1.0)
    width = scores.shape[1]
    keep = min(width, -(-n * width // m))
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.topk(scores, keep, dim=1).indices, False)
    return mask.t()


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
    cols = w.shape[1]
    u = hinv.u
    # Where w has no zeros (a dense model, the usual case), no (out, in) mask of them is held.
    frozen_all = w == 0 if int(torch.count_nonzero(w)) < w.numel() else None
    total = 0.0
    if n_m is not None:
        block = max(1, block // n_m[1]) * n_m[1]
    step = _step(block, n_m)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        # Transposed through a contiguous copy, as the block is (each op on a strided view of
        # the mask went element by element: 11 vs 0.9 ms per block of gate_proj).
        frozen = None if frozen_all is None else frozen_all[:, i1:i2].contiguous().t().contiguous()
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
    frozen: torch.Tensor | None,
    sparsity: float,
    n_m: tuple[int, int] | None,
    i1: int,
    i2: int,
    step: int,
) -> torch.Tensor:
    """Prune and update columns ``i1:i2`` of ``w`` in place (``u_block``: ``U[i1:i2, i1:i2]``,
    ``frozen``: the block's weights zero already, transposed, or None); returns their errors,
    transposed (``(B, out)``)."""
    hinv1 = u_block.contiguous()  # (B, B)
    diag = torch.diagonal(hinv1)
    # The block transposed, (B, out): each column of w a contiguous row. Through a contiguous
    # copy first: torch transposes a contiguous matrix in tiles, a strided slice of ``w`` element
    # by element (1.4-4 ms against 0.3-1 ms per 128 columns).
    w1 = w[:, i1:i2].contiguous().t().contiguous()
    err1 = torch.empty_like(w1)
    if n_m is None:
        # Chosen on the block before its loop; equal scores are taken in row order.
        mask1 = _block_mask(w1, diag, frozen, sparsity)
        divisor = _divisor(mask1, diag)
    else:
        mask1 = torch.empty_like(w1, dtype=torch.bool)
        divisor = torch.empty_like(w1)
    # Row i: column i of the factor, from the diagonal up, contiguous.
    columns = hinv1.t().contiguous()
    for j1 in range(0, i2 - i1, step):
        j2 = min(j1 + step, i2 - i1)
        _columns(w1, err1, mask1, divisor, hinv1, columns, frozen, j1, j2, n_m)
        # The rest of the block at once, then the next run of columns.
        w1[j2:].addmm_(hinv1[j1:j2, j2:].t(), err1[j1:j2], alpha=-1.0)
    # Times the kept-mask, then + 0.0 so a pruned negative weight is +0.0, not -0.0: the
    # result of masked_fill_, which on a bool mask takes 4-5x as long here.
    w[:, i1:i2] = w1.mul_(mask1.logical_not()).add_(0.0).t().contiguous()
    return err1


def _divisor(mask: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """What each weight's error is its value over: the factor's diagonal where pruned, infinity
    where kept (the kept weights' error is 0 in the same division). The diagonal is positive, so
    ``d / 1 = d`` and ``d / 0 = inf``: a float division, ~5x faster than ``torch.where`` on the
    bool mask."""
    return diag.unsqueeze(1) / mask.to(diag.dtype)


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
    divisor: torch.Tensor,
    hinv1: torch.Tensor,
    columns: torch.Tensor,
    frozen: torch.Tensor | None,
    j1: int,
    j2: int,
    n_m: tuple[int, int] | None,
) -> None:
    """Columns ``j1:j2`` of a transposed block (``w1``, ``err1``, ``mask1``, ``divisor``:
    ``(B, out)``), one at a time, each first updated by the errors of the columns before it in
    ``j1:j2`` (the columns before ``j1`` updated it already). Each column is left updated but
    unmasked in ``w1``: :func:`_block` zeroes the pruned weights once, after its last run.

    Left-looking: each column is one ``out``-long vector and one small product, not a rank-one
    update of the rest of the block: at 5,632 rows that update is ~10^5 elements per column, an
    op torch splits over threads, and on a busy CPU every such split waits on a preempted thread.
    Two ops per column, in place: at thousands of columns per linear, each op's dispatch and
    allocation cost as much as its arithmetic.
    """
    diag = torch.diagonal(hinv1)
    for i in range(j1, j2):
        if n_m is not None and (i - j1) % n_m[1] == 0:
            j = min(i + n_m[1], j2)
            run = w1[i:j]
            if i > j1:
                run = torch.addmm(run, hinv1[j1:i, i:j].t(), err1[j1:i], alpha=-1.0)
            held = None if frozen is None else frozen[i:j]
            mask1[i:j] = _run_mask(run, diag[i:j], held, *n_m)
            divisor[i:j] = _divisor(mask1[i:j], diag[i:j])
        col = w1[i]
        if i > j1:
            col.addmv_(err1[j1:i].t(), columns[i, j1:i], alpha=-1.0)
        torch.div(col, divisor[i], out=err1[i])


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
