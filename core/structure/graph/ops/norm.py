"""Normalisation: batch norm slices its affine parameters and statistics with the channels;
layer norm over the channels also rewrites its ``normalized_shape``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from core.structure.graph.model import Label, NodeLabel, Role
from core.structure.graph.nodes import Blocked, args_of, rank_of
from core.structure.graph.registry import register_op

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer


@register_op("batch_norm")
def batch_norm(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    if label.dim != 1 or label.inner != 1 or label.unit != 1:
        raise Blocked(f"{node.name} normalises a dimension that is not the channels")
    roles: tuple[tuple[int, Role], ...] = ((1, "norm"), (2, "bias"), (3, "stat"), (4, "stat"))
    for i, role in roles:
        if len(args_of(node)) > i and args_of(node)[i] is not None:
            ctx.member(args_of(node)[i], 0, label.moved(0), role)
    return label


@register_op("_native_batch_norm_legit_no_training")
def batch_norm_no_training(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """The exported eval-mode batch norm: (output, saved mean, saved invstd)."""
    label = batch_norm(ctx, node)
    return (label, None, None)


@register_op("layer_norm")
def layer_norm(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    rank = rank_of(args_of(node)[0])
    shape = list(args_of(node)[1])
    if label.dim < rank - len(shape):
        return label  # normalised over other dimensions only
    if label.dim != rank - 1 or len(shape) != 1 or label.inner != 1 or label.unit != 1:
        raise Blocked(f"{node.name} normalises over channels and other dimensions")
    ln_roles: tuple[tuple[int, Role], ...] = ((2, "norm"), (3, "bias"))
    for i, role in ln_roles:
        if len(args_of(node)) > i and args_of(node)[i] is not None:
            ctx.member(args_of(node)[i], 0, label.moved(0), role)
    ctx.rewrite(node, 1, 0, label)
    ctx.mark_normalized(label)
    return label
