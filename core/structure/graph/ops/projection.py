"""Every ATen spelling of a linear layer: ``linear``, ``addmm``/``mm``/``matmul`` against a
parameter in either layout, and ``einsum`` where it projects over a parameter.

A projection consumes the channels of its input's last dimension (the weight's *input* dim) and
starts a space of its own (the weight's *output* dim). GPT-2's ``Conv1D`` exports as
``addmm(bias, x, W)`` with ``W`` shaped (in, out); ``nn.Linear`` as ``linear(x, W)`` with (out,
in); a hand-written ``x @ W.t()`` as ``matmul(x, t(W))``. They are one op to the pass: only which
weight dim is which differs. A matmul of two computed tensors is attention's (see
:mod:`.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx

from core.einsum import projection_dims
from core.structure.graph.model import Label
from core.structure.graph.nodes import (
    Blocked,
    args_of,
    const_int,
    layer_name,
    nodes_in,
    norm_dim,
    packet,
    rank_of,
    shape_of,
)
from core.structure.graph.ops.attention import coupled_heads
from core.structure.graph.registry import register_op

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer


@dataclass(frozen=True)
class Weight:
    """A 2-D parameter used as a projection: ``node`` is its ``get_attr``; ``in_dim`` the dim
    that is summed over, ``out_dim`` the one that becomes the output's last dim."""

    node: fx.Node
    in_dim: int
    out_dim: int


def _transposed(node: fx.Node) -> fx.Node | None:
    """The parameter behind ``t(p)``/``p.T``/``transpose(p, 0, 1)``/``permute(p, [1, 0])``, else
    None."""
    if node.op != "call_function":
        return None
    op, args = packet(node), args_of(node)
    source = args[0] if args else None
    if not isinstance(source, fx.Node) or source.op != "get_attr":
        return None
    if op in ("t", "numpy_T"):
        return source
    if op == "transpose" and {norm_dim(const_int(d), 2) for d in args[1:3]} == {0, 1}:
        return source
    if op == "permute" and [norm_dim(const_int(d), 2) for d in args[1]] == [1, 0]:
        return source
    return None


def weight_operand(ctx: Analyzer, operand: object, *, transposed: bool = False) -> Weight | None:
    """``operand`` as the right-hand side of ``x @ operand`` when it is a 2-D parameter (or a
    transpose of one); ``transposed`` when the op itself reads it as (out, in) (``linear``)."""
    if not isinstance(operand, fx.Node) or len(shape_of(operand) or ()) != 2:
        return None
    if ctx.param(operand) is not None:
        return Weight(operand, 1, 0) if transposed else Weight(operand, 0, 1)
    source = _transposed(operand)
    if source is None or ctx.param(source) is None:
        return None
    return Weight(source, 0, 1) if transposed else Weight(source, 1, 0)


def project(ctx: Analyzer, node: fx.Node, x: object, weight: Weight, bias: object) -> Label:
    """``x`` (channels on its last dim) times ``weight``, plus ``bias``: a new channel space."""
    label = ctx.label_of(x)
    rank = rank_of(x)
    if label is not None:
        if label.dim != rank - 1 or label.unit != 1:
            raise Blocked(f"{node.name} applies a linear layer across another dimension")
        ctx.member(weight.node, weight.in_dim, label.moved(weight.in_dim), "in")
    size = int((shape_of(weight.node) or (0, 0))[weight.out_dim])
    out = ctx.new_space(size, layer_name(ctx.param(weight.node), node), node, rank - 1)
    ctx.member(weight.node, weight.out_dim, out.moved(weight.out_dim), "out")
    if isinstance(bias, fx.Node):
        if len(shape_of(bias) or ()) != 1:
            raise Blocked(f"{node.name} adds a bias that is not one value per output")
        ctx.member(bias, 0, out.moved(0), "bias")
    return out


@register_op("linear")
def linear(ctx: Analyzer, node: fx.Node) -> Label:
    args = args_of(node)
    weight = weight_operand(ctx, args[1], transposed=True)
    if weight is None:
        raise Blocked(f"{node.name}: the linear weight is not a parameter")
    return project(ctx, node, args[0], weight, args[2] if len(args) > 2 else None)


@register_op("addmm")
def addmm(ctx: Analyzer, node: fx.Node) -> Label:
    """``bias + x @ W`` (GPT-2's Conv1D: ``W`` is (in, out))."""
    bias, x, w = args_of(node)[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise Blocked(f"{node.name} scales its product")
    weight = weight_operand(ctx, w)
    if weight is None:
        raise Blocked(f"{node.name} multiplies by a tensor that is not a parameter")
    return project(ctx, node, x, weight, bias)


@register_op("mm")
def mm(ctx: Analyzer, node: fx.Node) -> Label | None:
    x, w = args_of(node)[:2]
    weight = weight_operand(ctx, w)
    if weight is None:
        if ctx.label_of(x) is None and ctx.label_of(w) is None:
            return None
        raise Blocked(f"{node.name} multiplies by a tensor that is not a parameter")
    return project(ctx, node, x, weight, None)


@register_op("matmul")
def matmul(ctx: Analyzer, node: fx.Node) -> Label | None:
    """Against a parameter: a linear layer; between two computed tensors: attention."""
    x, w = args_of(node)[:2]
    weight = weight_operand(ctx, w)
    if weight is not None:
        return project(ctx, node, x, weight, None)
    if ctx.label_of(x) is None and ctx.label_of(w) is None:
        return None
    return coupled_heads(ctx, node, (x, w))


@register_op("einsum")
def einsum(ctx: Analyzer, node: fx.Node) -> Label | None:
    """``einsum("bsi,oi->bso", x, W)`` and the like: a projection over a 2-D parameter (or a
    transpose of one) that keeps the other operand's leading indices in order."""
    equation, operands = args_of(node)[:2]
    if isinstance(equation, str) and isinstance(operands, (list, tuple)) and len(operands) == 2:
        for w_pos in (1, 0):
            dims = projection_dims(equation, w_pos)
            weight = weight_operand(ctx, operands[w_pos])
            if dims is None or weight is None:
                continue
            if dims[0] == 1:  # the equation reads this operand as (out, in)
                weight = Weight(weight.node, weight.out_dim, weight.in_dim)
            return project(ctx, node, operands[1 - w_pos], weight, None)
    if any(ctx.label_of(o) is not None for o in nodes_in(operands)):
        raise Blocked(f"{node.name} contracts channels in a way that is not a projection")
    return None
