"""Reading fx nodes: their op, arguments, shapes and (possibly symbolic) sizes.

Helpers shared by the analyzer and the op handlers. Those that need a constant raise
:class:`Blocked`, which blocks the channels the node touches.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import sympy
import torch
from torch import fx

from core.structure.graph.model import Label, Parts


class Blocked(Exception):
    """Raised inside an op handler: the labelled inputs of this node become unprunable.

    The message is the reason the groups report.
    """


def packet(node: fx.Node) -> str:
    """The op's name without namespace or overload (``conv2d`` for ``aten.conv2d.default``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def args_of(node: fx.Node) -> tuple[Any, ...]:
    """A node's positional arguments, untyped: their types depend on the op's schema."""
    return tuple(node.args)


def shape_of(node: object) -> tuple[Any, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def rank_of(node: object) -> int:
    shape = shape_of(node)
    if shape is None:
        raise Blocked(f"{node} has no known shape")
    return len(shape)


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def const_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Blocked(f"expected a constant integer, got {value!r}")
    return value


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def same_size(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether two products of (possibly symbolic) sizes are equal for every input size."""
    pa = math.prod((_expr(x) for x in a), start=sympy.Integer(1))
    pb = math.prod((_expr(x) for x in b), start=sympy.Integer(1))
    return bool(sympy.expand(pa - pb) == 0)


def static_size(size: object) -> int | None:
    if isinstance(size, int):
        return size
    expr = _expr(size)
    return int(expr) if expr.is_Integer else None


def prefix_match(prefix: Sequence[object], out: Sequence[object]) -> int | None:
    """The k for which ``out[:k]`` holds as many elements as ``prefix``, or None.

    Size-1 dims right after the prefix go with it (the largest such k): MobileViT's single
    patch, ``(4B, 1, C) -> (4B, 1, H, D)``, keeps its sequence dim and splits C into heads,
    rather than splitting ``1*C`` into three dims."""
    found = None
    for k in range(len(out) + 1):
        if same_size(prefix, out[:k]):
            found = k
        elif found is not None:
            break
    return found


def nodes_in(tree: object) -> Iterator[fx.Node]:
    """The nodes inside nested argument lists, tuples and dicts."""
    if isinstance(tree, fx.Node):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from nodes_in(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from nodes_in(item)


def flat_labels(label: object) -> Iterator[Label]:
    if isinstance(label, Label):
        yield label
    elif isinstance(label, Parts):
        yield from label.labels
    elif isinstance(label, tuple):
        for item in label:
            yield from flat_labels(item)


def layer_name(target: str | None, node: fx.Node) -> str:
    if target is None:
        return node.name
    # Layer names are weight paths without ".weight", as in the archive's prunable layers.
    return target.removesuffix(".weight") if target.endswith(".weight") else target
