"""Elementwise ops, softmax, pooling and reductions: channels pass through or are reduced away."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import fx

from core.structure.graph.model import Label, NodeLabel
from core.structure.graph.nodes import (
    Blocked,
    args_of,
    const_int,
    nodes_in,
    norm_dim,
    packet,
    rank_of,
    shape_of,
    static_size,
)
from core.structure.graph.registry import register_op

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer

# Ops whose output has the input's shape and mixes nothing across channels.
UNARY = (
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "relu6", "dropout", "clone",
    "contiguous", "detach", "alias", "_to_copy", "to", "abs", "neg", "exp", "sqrt", "rsqrt",
    "pow", "clamp", "clamp_min", "clamp_max", "square", "erf", "log", "log1p", "reciprocal",
    "lift_fresh_copy", "feature_dropout", "alpha_dropout", "identity", "detach_",
    # In place (MobileNetV2's classifier dropout exports as dropout_).
    "dropout_", "silu_", "gelu_", "sigmoid_", "tanh_", "clamp_", "hardswish_", "leaky_relu_",
)  # fmt: skip
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "rsub", "true_divide", "masked_fill")
# In place on a temporary (Falcon's ``mlp_output += attention_output``): channels as the above.
BINARY_INPLACE = ("add_", "sub_", "mul_", "div_")
# Pooling over the spatial dims of (N, C, *spatial): channels pass through untouched.
POOL = (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "pad",
    "constant_pad_nd",
)  # fmt: skip
REDUCE = ("mean", "sum", "amax", "amin", "max", "min", "var", "std")


@register_op(*UNARY)
def unary(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """One tensor in, the same shape out: the channels pass through."""
    for extra in nodes_in((args_of(node)[1:], node.kwargs)):
        if ctx.result_of(extra) is not None or ctx.param(extra):
            raise Blocked(f"{node.name} takes a second tensor")
    return ctx.label_of(args_of(node)[0])


@register_op("type_as")
def type_as(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """``a.type_as(b)``: ``a``'s values in ``b``'s dtype; ``b``'s channels are not read (Gemma's
    RMSNorm casts back to its input's dtype)."""
    return ctx.label_of(args_of(node)[0])


@register_op("_assert_tensor_metadata")
def assert_metadata(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """A check of dtype and device only (transformers emits it): it reads no channel."""
    return None


@register_op(*BINARY, *BINARY_INPLACE)
def binary(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """Two tensors broadcast together: their channels couple; a parameter operand is sliced."""
    return broadcast(ctx, node, args_of(node)[:2])


@register_op("where")
def where(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """``where(condition, a, b)``: three tensors broadcast together (a causal mask's fill)."""
    return broadcast(ctx, node, args_of(node)[:3])


def broadcast(ctx: Analyzer, node: fx.Node, operands: tuple[object, ...]) -> NodeLabel:
    """Tensors broadcast elementwise: their channels couple; a parameter operand is sliced."""
    out = shape_of(node)
    if out is None:
        raise Blocked(f"{node.name} has no known shape")
    rank = len(out)
    result: Label | None = None
    tensors = [x for x in operands if isinstance(x, fx.Node)]
    labels = [(x, ctx.label_of(x)) for x in tensors]
    aligned = [(x, lab.moved(rank - rank_of(x) + lab.dim) if lab else None) for x, lab in labels]
    known = [lab for _, lab in aligned if lab is not None]
    # Heads first: a plain label meeting them is one value per head.
    for lab in sorted(known, key=lambda known_label: known_label.unit == 1):
        if result is None:
            result = lab
        elif lab.dim != result.dim:
            raise Blocked(f"{node.name} combines channels on different dimensions")
        elif result.unit > 1 and (lab.unit, lab.inner, lab.repeat) == (1, 1, 1):
            # A bias per head added to the scores (Swin V2's relative position bias, made by
            # an MLP): removed with its head.
            ctx.link_kv(result, lab, node.name)
        else:
            ctx.union(result, lab, node.name)
    if result is None:
        return None
    for x, operand in aligned:
        if operand is not None:
            continue
        shape = shape_of(x) or ()
        pos = result.dim - (rank - len(shape))
        if pos < 0 or static_size(shape[pos]) == 1:
            continue  # broadcast along the channels: nothing to slice
        ctx.member(_param_behind(ctx, x), pos, result.moved(pos), "param")
    return result


def _param_behind(ctx: Analyzer, x: fx.Node) -> fx.Node:
    """The parameter ``x`` is computed from elementwise, when nothing else reads the steps in
    between: Swin V2's ``logit_scale.clamp(max=...).exp()``, Gemma's ``1 + weight``. Slicing the
    parameter slices ``x`` alike. ``x`` itself otherwise."""
    source = x
    while ctx.param(source) is None and source.op == "call_function" and len(source.users) == 1:
        op, args = packet(source), args_of(source)
        tensors = list(nodes_in((args, source.kwargs)))
        if op not in UNARY + BINARY or len(tensors) != 1 or shape_of(tensors[0]) != shape_of(x):
            break
        source = tensors[0]
    return source if ctx.param(source) is not None else x


@register_op("softmax", "log_softmax", "_softmax")
def softmax(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    label = ctx.label_of(args_of(node)[0])
    if (
        label is not None
        and norm_dim(const_int(args_of(node)[1]), rank_of(args_of(node)[0])) == label.dim
    ):
        raise Blocked(f"{node.name} normalises over the channels")
    return label


@register_op(*POOL)
def pool(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """Pooling, resizing and padding over the spatial dims of (N, C, *spatial)."""
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    rank = rank_of(args_of(node)[0])
    if packet(node) in ("pad", "constant_pad_nd"):
        pads = args_of(node)[1]
        touched = len(pads) // 2
        if label.dim >= rank - touched:
            raise Blocked(f"{node.name} pads the channel dimension")
    elif label.dim != 1 or rank < 3:
        raise Blocked(f"{node.name} pools over the channel dimension")
    if packet(node) == "max_pool2d_with_indices":
        return (label, label)
    return label


@register_op(*REDUCE)
def reduce(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """A reduction over other dimensions keeps the channels (moved when dims go)."""
    return _reduced(ctx, node, 1)


@register_op("linalg_vector_norm")
def vector_norm(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """``linalg_vector_norm(x, ord, dim, keepdim)``: a reduction (Swin V2's cosine attention
    normalises q and k within each head)."""
    return _reduced(ctx, node, 2)


def _reduced(ctx: Analyzer, node: fx.Node, at: int) -> NodeLabel:
    """A reduction whose dims are argument ``at`` and keepdim the one after it."""
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    rank = rank_of(args_of(node)[0])
    dims: Any = args_of(node)[at] if len(args_of(node)) > at else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise Blocked(f"{node.name} reduces over every dimension")
    dim_list = [dims] if isinstance(dims, int) else list(dims)
    reduced = {norm_dim(const_int(d), rank) for d in dim_list}
    if label.dim in reduced:
        raise Blocked(f"{node.name} reduces over the channels")
    args = args_of(node)
    keepdim = bool(args[at + 1]) if len(args) > at + 1 else bool(node.kwargs.get("keepdim"))
    if keepdim:
        return label
    return label.moved(label.dim - sum(1 for d in reduced if d < label.dim))
