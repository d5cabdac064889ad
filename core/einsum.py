"""Reading an ``einsum`` equation as a projection: ``"bsi,oi->bso"`` is ``x @ W.T``."""

from __future__ import annotations


def projection_dims(equation: str, weight: int) -> tuple[int, int] | None:
    """``(in_dim, out_dim)`` of operand ``weight`` (0 or 1, a 2-D tensor) when ``equation``
    contracts the other operand's last index with it and puts its other index last, keeping the
    other operand's leading indices in order; None for any other contraction."""
    if "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or weight not in (0, 1):
        return None
    w_terms, x_terms = terms[weight], terms[1 - weight]
    if len(w_terms) != 2 or len(set(w_terms)) != 2 or not x_terms:
        return None
    contracted = x_terms[-1]
    if contracted not in w_terms or contracted in output:
        return None
    produced = w_terms[1 - w_terms.index(contracted)]
    if produced in x_terms or output != x_terms[:-1] + produced:
        return None
    return w_terms.index(contracted), w_terms.index(produced)
