"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and update its kept weights so its
outputs on the calibration data change as little as possible.

From the Hessian ``H = 2 X X^T`` of the layer's inputs (dampened by 1% of its mean diagonal), the
upper Cholesky factor of ``H^-1`` drives an OBS sweep over the input columns: in each block of
128 columns the mask is chosen on the weights as updated so far (adaptive mask selection, score
``w^2 / [H^-1]_jj^2``), and every pruned weight's error is spread over the columns after it.
With n:m the mask is chosen per run of ``m`` columns instead.

Two choices differ from the reference code, both for exact counts: each block removes exactly
``round(s x rows x columns)`` weights (the reference thresholds with ``<=``, which can take
more on ties), and weights that are zero already are always in the mask (so rounds nest and
held zeros stay zero). Columns whose input is always zero keep their weights (the reference
zeroes them, which would remove more than asked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.allocation import removal_count

BLOCK = 128
DAMPING = 0.01


@dataclass(frozen=True)
class InverseHessian:
    """What the OBS sweep needs of a Hessian, held in the Hessian's own buffer.

    ``u`` is the upper Cholesky factor of the dampened ``H^-1`` (a column-major view of the
    buffer ``X X^T`` was collected in, which it overwrote); ``damping`` is the value added to the
    diagonal and ``dead`` marks the inputs that were always zero (their diagonal set to 1 before
    dampening): with them the error of a sweep on the undampened Hessian follows from the sweep
    itself (:func:`sweep`).
    """

    u: torch.Tensor
    damping: float
    dead: torch.Tensor


def inverse_hessian_(xxt: torch.Tensor, damping: float = DAMPING) -> InverseHessian:
    """Factor ``xxt`` (``(in, in)``, float32, symmetric) in place into :class:`InverseHessian`.

    The Hessian of a wide linear (``intermediate^2``) is the largest allocation of the whole
    prune. LAPACK factors a column-major matrix in place, and ``xxt.mT`` is one (symmetric: the
    same matrix); handed a row-major one, torch would factor a temporary copy of it.
    """
    if xxt.dtype != torch.float32 or xxt.dim() != 2 or not xxt.is_contiguous():
        raise ValueError(f"xxt must be a contiguous float32 matrix, got {xxt.dtype}")
    h = xxt.mT
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0  # an input that is always zero: its column is decoupled
    value = damping * float(diag.mean())
    diag.add_(value)
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky(h, upper=True, out=h)
    return InverseHessian(h, value, dead)


def _block_mask(
    w: torch.Tensor, hinv_diag: torch.Tensor, frozen: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Prune-mask (True = remove) of one block: the ``round(s x numel)`` lowest OBS scores,
    plus every weight already zero."""
    scores = (w.square() / hinv_diag.square().unsqueeze(0)).masked_fill(frozen, -1.0)
    k = removal_count(sparsity, scores.numel())
    mask = frozen.flatten()  # a copy: the block is a column slice
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
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
    hinv = inverse_hessian_(xxt.to(torch.float32, copy=True).contiguous(), damping)
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
    squared OBS errors, ``||(W - W') X||^2`` on the dampened Hessian.

    With ``E`` the errors of every column, ``W - W' = E U`` and ``U H Uᵀ = I``, so that error is
    ``||E||^2``: no Hessian is needed to report it (see :func:`error_on_data`).
    """
    cols = w.shape[1]
    u = hinv.u
    frozen_all = w == 0
    total = 0.0
    if n_m is not None:
        block = max(1, block // n_m[1]) * n_m[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        hinv1 = u[i1:i2, i1:i2]  # (B, B)
        diag = torch.diagonal(hinv1)
        frozen = frozen_all[:, i1:i2]
        err1 = torch.zeros_like(w1)
        if n_m is None:
            mask1 = _block_mask(w1, diag, frozen, sparsity)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                j = min(i + n_m[1], i2 - i1)
                mask1[:, i:j] = _run_mask(w1[:, i:j], diag[i:j], frozen[:, i:j], *n_m)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            err = (col - q) / hinv1[i, i]  # (out,)
            # Spread the error over the columns after i in this block; column i becomes q.
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        # In place: ``w[:, i2:] -= err1 @ ...`` would hold a product nearly the size of ``w``.
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
        total += float(err1.square().sum(dtype=torch.float64))
    return total


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
    overwrote). Rows are taken ``rows`` at a time, so no ``(out, in)`` temporary is made.
    """
    damped = 0.0
    dead = 0.0
    for start in range(0, before.shape[0], rows):
        delta = before[start : start + rows].to(torch.float32) - after[start : start + rows].to(
            torch.float32
        )
        square = delta.square()
        damped += float(square.sum(dtype=torch.float64))
        if bool(hinv.dead.any()):
            dead += float(square[:, hinv.dead].sum(dtype=torch.float64))
    return max(0.0, swept - hinv.damping * damped - dead)


def reconstruction_error(
    before: torch.Tensor, after: torch.Tensor, xxt: torch.Tensor, *, rows: int = 256
) -> float:
    """``||(W - W')X||_F^2``: the squared error the change adds to the layer's outputs, summed
    over the calibration tokens ``X`` (from ``X X^T``).

    Computed ``rows`` output rows at a time in float32 (summed in float64), so it needs no
    float64 copy of the Hessian and no full ``(out, in)`` temporaries.
    """
    h = xxt.to(torch.float32)
    total = 0.0
    for start in range(0, before.shape[0], rows):
        delta = before[start : start + rows].to(torch.float32) - after[start : start + rows].to(
            torch.float32
        )
        total += float(((delta @ h) * delta).sum(dtype=torch.float64))
    return total
