"""A symmetric or upper-triangular ``(n, n)`` matrix held as its upper triangle in row panels,
and SparseGPT's factorisation of a Hessian in that storage.

Panel ``k`` is rows ``kP:(k+1)P`` from column ``kP`` on (``P`` = ``panel_rows``), one row-major
``(P, n - kP)`` block after the other in one flat buffer: about ``n^2 / 2 + nP / 2`` numbers
instead of ``n^2``. SparseGPT's Hessian ``X X^T`` (the largest allocation of a prune: 121 MiB
for a 5,632-input ``down_proj``, 784 MiB at 14,336) is collected, factored and swept in it, so
it takes about half of that. The OBS sweep reads the factor of ``H^-1`` a block of rows at a time
from its diagonal on, ``U[i:i+B, i:]``: with ``B = P`` (:data:`PANEL` is SparseGPT's block)
that is one panel, a view.

The factorisation is blocked on the panels with torch's own products (no LAPACK call needs a
square matrix), so the same code runs on any device: ``H = R R^T`` with ``R`` upper triangular
(a Cholesky factorisation from the bottom-right corner up), then ``U = R^-1`` in place, which is
the upper Cholesky factor of ``H^-1`` (``U^T U = R^-T R^-1 = H^-1``). ``2 n^3 / 3`` operations,
as LAPACK's ``potrf`` and ``trtri`` on the full square.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# SparseGPT's block (core.pruning.llm.sparsegpt.BLOCK): one block of the sweep is one panel.
PANEL = 128


@dataclass(frozen=True)
class UpperPanels:
    """The upper triangle of an ``(n, n)`` matrix in row panels of ``panel_rows`` rows (see the
    module's docstring); ``flat`` holds them all. The strict lower triangle of each diagonal
    block is stored too (a panel is rectangular): the factorisation reads none of it and leaves
    zeros there."""

    n: int
    panel_rows: int
    flat: torch.Tensor

    @staticmethod
    def numel(n: int, panel: int = PANEL) -> int:
        """Numbers held for an ``(n, n)`` matrix."""
        return sum(min(panel, n - a) * (n - a) for a in range(0, n, panel))

    @classmethod
    def zeros(
        cls,
        n: int,
        device: torch.device | str = "cpu",
        panel: int = PANEL,
        dtype: torch.dtype = torch.float32,
    ) -> UpperPanels:
        return cls(n, panel, torch.zeros(cls.numel(n, panel), dtype=dtype, device=device))

    @classmethod
    def from_lower(cls, matrix: torch.Tensor, panel: int = PANEL) -> UpperPanels:
        """The symmetric matrix whose lower triangle ``matrix`` holds (the rest is not read),
        as a float32 copy."""
        n = matrix.shape[0]
        panels = cls.zeros(n, matrix.device, panel)
        for k, a in enumerate(range(0, n, panel)):
            b = min(a + panel, n)
            block = matrix[a:, a:b].to(torch.float32).t()  # rows a:b, columns a:, by symmetry
            # Inside the diagonal block only its lower triangle is read.
            diagonal = torch.tril(block[:, : b - a].t())
            block = torch.cat([diagonal + torch.tril(diagonal, -1).t(), block[:, b - a :]], 1)
            panels.panel(k).copy_(block)
        return panels

    @property
    def count(self) -> int:
        """The number of panels."""
        return -(-self.n // self.panel_rows)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def _offset(self, k: int) -> int:
        # sum over j < k of panel x (n - j panel): every panel before the last is full.
        p = self.panel_rows
        return p * (k * self.n - p * k * (k - 1) // 2)

    def panel(self, k: int) -> torch.Tensor:
        """Rows ``kP:(k+1)P`` from column ``kP`` on, ``(rows, n - kP)``: a view."""
        a = k * self.panel_rows
        rows = min(self.panel_rows, self.n - a)
        start = self._offset(k)
        return self.flat[start : start + rows * (self.n - a)].view(rows, self.n - a)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` from column ``a`` on, ``(b - a, n - a)``: a view where they lie in one
        panel (from its first row), else a copy."""
        k, first = divmod(a, self.panel_rows)
        if first == 0 and b <= min(a + self.panel_rows, self.n):
            return self.panel(k)[: b - a]
        out = torch.empty(b - a, self.n - a, dtype=self.flat.dtype, device=self.flat.device)
        row = a
        while row < b:
            k, first = divmod(row, self.panel_rows)
            block = self.panel(k)
            stop = min(b, k * self.panel_rows + block.shape[0])
            # Columns a:row of these rows are below the diagonal: zero in an upper matrix.
            out[row - a : stop - a, : row - a] = 0.0
            out[row - a : stop - a, row - a :] = block[first : first + stop - row, first:]
            row = stop
        return out

    def diagonal_blocks(self) -> list[torch.Tensor]:
        """Each panel's ``(rows, rows)`` diagonal block, views."""
        return [self.panel(k)[:, : self.panel(k).shape[0]] for k in range(self.count)]

    def dense(self) -> torch.Tensor:
        """The upper triangle as a full ``(n, n)`` matrix, zeros below the diagonal (a copy,
        for tests and small matrices)."""
        out = torch.zeros(self.n, self.n, dtype=self.flat.dtype, device=self.flat.device)
        for k in range(self.count):
            a = k * self.panel_rows
            block = self.panel(k)
            out[a : a + block.shape[0], a:] = block
        return out.triu()

    def add_gram_(self, x: torch.Tensor) -> None:
        """Add ``x^T x`` (``x``: ``(tokens, n)``, float32) in place: each panel one product,
        ``x[:, rows]^T x[:, rows.start:]``, about half of the full product's operations (the
        diagonal blocks whole)."""
        for k in range(self.count):
            a = k * self.panel_rows
            block = self.panel(k)
            block.addmm_(x[:, a : a + block.shape[0]].t(), x[:, a:])


def invert_factor_(h: UpperPanels) -> None:
    """Overwrite the symmetric positive definite ``h`` (its upper triangle) with the upper
    Cholesky factor ``U`` of its inverse, panel by panel.

    Raises:
        torch.linalg.LinAlgError: ``h`` is not positive definite.
    """
    _upper_lower_cholesky_(h)
    _invert_upper_(h)


def _column_block(h: UpperPanels, j: int) -> torch.Tensor:
    """Rows ``:a`` of the columns ``a:a+P`` of panel ``j`` (``a = jP``), gathered from the
    panels above it: ``(a, P)``, a copy."""
    p = h.panel_rows
    a, width = j * p, h.panel(j).shape[0]
    return torch.cat([h.panel(i)[:, a - i * p : a - i * p + width] for i in range(j)])


def _set_column_block(h: UpperPanels, j: int, column: torch.Tensor) -> None:
    p = h.panel_rows
    a, width = j * p, h.panel(j).shape[0]
    for i in range(j):
        h.panel(i)[:, a - i * p : a - i * p + width] = column[i * p : (i + 1) * p]


def _upper_lower_cholesky_(h: UpperPanels) -> None:
    """``H = R R^T`` with ``R`` upper triangular, ``R`` over ``H`` in place, one column block at
    a time from the last up (left-looking, as LAPACK's ``potrf`` with the order reversed): the
    block, diagonal included, loses what the columns right of it gave it (one product per panel
    above, over all those columns), its diagonal block is factored and the rest solved against
    that factor."""
    p = h.panel_rows
    for j in range(h.count - 1, -1, -1):
        a = j * p
        own = h.panel(j)
        width = own.shape[0]
        right = own[:, width:]  # R of rows a:a+P, right of the block
        if right.shape[1]:
            for i in range(j + 1):
                rows = h.panel(i)
                start = a - i * p
                rows[:, start : start + width].addmm_(
                    rows[:, start + width :], right.t(), alpha=-1.0
                )
        diagonal = own[:, :width]
        diagonal.copy_(_ul_factor(diagonal))
        if j:
            # R_ij R_jj^T = H_ij for every panel i above.
            column = torch.linalg.solve_triangular(
                diagonal.t(), _column_block(h, j), upper=False, left=False
            )
            _set_column_block(h, j, column)


def _ul_factor(block: torch.Tensor) -> torch.Tensor:
    """The upper triangular ``R`` with ``R R^T`` = the symmetric ``block`` (its upper triangle
    read): the lower Cholesky factor of the block reversed, reversed back."""
    upper = torch.triu(block)
    symmetric = upper + torch.triu(upper, 1).t()
    lower: torch.Tensor = torch.linalg.cholesky(symmetric.flip(0, 1))
    return lower.flip(0, 1)


def _invert_upper_(h: UpperPanels) -> None:
    """Overwrite the upper triangular ``R`` in ``h`` with ``X = R^-1``, one column block at a
    time from the first (LAPACK's ``trtri`` order): with the columns left of block ``j``
    inverted already, ``X_:j,j = -X_:j,:j R_:j,j R_jj^-1``, one product per panel above, over
    all the columns between it and the block."""
    p = h.panel_rows
    for j in range(h.count):
        a = j * p
        own = h.panel(j)
        width = own.shape[0]
        eye = torch.eye(width, dtype=own.dtype, device=own.device)
        inverse = torch.linalg.solve_triangular(own[:, :width], eye, upper=True)
        if j:
            column = _column_block(h, j)  # R_:j,j
            product = torch.empty_like(column)
            for i in range(j):
                torch.mm(
                    h.panel(i)[:, : a - i * p], column[i * p :], out=product[i * p : (i + 1) * p]
                )
            _set_column_block(h, j, torch.mm(product, inverse).neg_())
        own[:, :width] = inverse
