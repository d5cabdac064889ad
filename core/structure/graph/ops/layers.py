"""Layers that produce channels: convolutions (plain, depthwise, grouped, transposed) and
embeddings. Their outputs start new channel spaces; their weights' input dims consume labels.
Linear layers, in all their spellings, are :mod:`.projection`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from core.structure.graph.model import Label
from core.structure.graph.nodes import (
    Blocked,
    args_of,
    const_int,
    layer_name,
    rank_of,
    shape_of,
)
from core.structure.graph.registry import register_op

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer


def _conv(ctx: Analyzer, node: fx.Node, groups_arg: int, transposed: bool) -> Label:
    args = args_of(node)
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    groups = const_int(args[groups_arg]) if len(args) > groups_arg else 1
    label = ctx.label_of(x)
    wshape = shape_of(weight) or (0, 0)
    out_channels = int(wshape[0])
    name = layer_name(ctx.param(weight), node)
    if transposed:
        # Weight (in, out / groups, *kernel): the roles of dims 0 and 1 swap.
        out = ctx.new_space(int(wshape[1]) * groups, name, node, 1)
        if groups != 1 or (label is not None and (label.dim != 1 or label.unit != 1)):
            reason = f"{node.name}: grouped transposed convolutions are not supported yet"
            ctx.block(label, reason)
            ctx.block(out, reason)
            ctx.freeze_params(node, reason)
            return out
        if label is not None:
            ctx.member(weight, 0, label.moved(0), "in")
        ctx.member(weight, 1, out.moved(1), "out")
        if bias is not None:
            ctx.member(bias, 0, out.moved(0), "bias")
        return out
    if label is not None and (label.dim != 1 or label.unit != 1):
        raise Blocked(f"{node.name} convolves a tensor whose channels are not dim 1")
    in_channels = int((shape_of(x) or (0, 0))[1])
    if groups == 1:
        if label is not None:
            ctx.member(weight, 1, label.moved(1), "in")
        out = ctx.new_space(out_channels, name, node, 1)
        ctx.member(weight, 0, out.moved(0), "out")
        if bias is not None:
            ctx.member(bias, 0, out.moved(0), "bias")
        return out
    if groups == in_channels == out_channels and label is not None and label.inner == 1:
        # Depthwise: each filter reads only its own channel, so the channels pass through
        # and ``groups`` must follow the kept count.
        ctx.member(weight, 0, label.moved(0), "out")
        if bias is not None:
            ctx.member(bias, 0, label.moved(0), "bias")
        ctx.rewrite(node, groups_arg, None, label)
        return label
    # Grouped: block i of the inputs feeds block i of the outputs. Removing the same number
    # of channels from every block keeps ``groups``; each row then reads its own block's
    # surviving inputs (a per-block gather of the weight's input dim).
    out = ctx.new_space(out_channels, name, node, 1)
    ctx.need_blocks(out.spaces, groups)
    ctx.member(weight, 0, out.moved(0), "out")
    if bias is not None:
        ctx.member(bias, 0, out.moved(0), "bias")
    if label is not None:
        if label.inner != 1 or len(ctx.leaves(label.spaces)) != 1:
            reason = f"{node.name}: grouped convolution over concatenated channels"
            ctx.block(label, reason)
        else:
            ctx.need_blocks(label.spaces, groups)
            target = ctx.param(weight)
            if target is None:
                raise Blocked(f"{node.name}: the grouped weight is not a parameter")
            ctx.grouped_member(target, 1, label.moved(1), groups)
    return out


@register_op("conv1d", "conv2d", "conv3d")
def conv(ctx: Analyzer, node: fx.Node) -> Label:
    return _conv(ctx, node, 6, False)


@register_op("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(ctx: Analyzer, node: fx.Node) -> Label:
    return _conv(ctx, node, 6, True)


@register_op("convolution")
def convolution(ctx: Analyzer, node: fx.Node) -> Label:
    return _conv(ctx, node, 8, bool(args_of(node)[6]))


@register_op("embedding")
def embedding(ctx: Analyzer, node: fx.Node) -> Label:
    weight = args_of(node)[0]
    size = int((shape_of(weight) or (0, 0))[1])
    out = ctx.new_space(size, layer_name(ctx.param(weight), node), node, rank_of(node))
    out = out.moved(len(shape_of(node) or ()) - 1)
    ctx.member(weight, 1, out.moved(1), "out")
    return out
