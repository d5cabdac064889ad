"""Attention: q, k, v (or scores and v) couple head by head; ``nn.MultiheadAttention``, which
folds its heads into the batch, is matched as a whole (:mod:`core.structure.mha`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import fx

from core.structure.graph.model import Label
from core.structure.graph.nodes import (
    Blocked,
    args_of,
    const_int,
    nodes_in,
    packet,
    rank_of,
    shape_of,
    static_size,
)
from core.structure.graph.registry import register_op
from core.structure.mha import MhaMatch, match_mha

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer


def coupled_heads(ctx: Analyzer, node: fx.Node, tensors: Sequence[object]) -> Label:
    """q, k, v (or scores and v) of attention: head h of each goes with head h of the others.

    Keys and values repeated for grouped-query attention (``repeat_kv``) go with the query heads
    that read them: key/value head g with query heads g*r .. g*r + r-1. The output's heads are
    the queries'."""
    labels = [ctx.label_of(t) for t in tensors]
    if not ctx.heads:
        raise Blocked(f"{node.name} mixes channels within attention heads")
    known = [lab for lab in labels if lab is not None]
    if not known or len(known) != len(labels):
        raise Blocked(f"{node.name} attends over heads it cannot follow")
    rank = rank_of(tensors[0])
    for t, lab in zip(tensors, known, strict=True):
        if lab.unit == 1 or rank_of(t) != rank or lab.dim != known[0].dim or lab.dim >= rank - 2:
            raise Blocked(f"{node.name} attends over channels that are not whole heads")
    if all(lab == known[0] for lab in known):
        # One fused projection's heads read alike (Falcon's per-group queries, key and value):
        # head positions line up already, however many positions each head has.
        return known[0]
    plain = [lab for lab in known if lab.repeat == 1]
    if not plain:
        raise Blocked(f"{node.name} attends with repeated keys and no query heads")
    for lab in plain[1:]:
        ctx.union(plain[0], lab, node.name)
    for lab in known:
        if lab.repeat > 1:
            ctx.link_kv(plain[0], lab, node.name)
    return plain[0] if len(plain) < len(known) else known[-1]


@register_op("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: Analyzer, node: fx.Node) -> Label:
    args = args_of(node)
    mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
    for extra in nodes_in((args[4:], {k: v for k, v in node.kwargs.items() if k != "attn_mask"})):
        if ctx.result_of(extra) is not None:
            raise Blocked(f"{node.name} takes an argument sized by the heads")
    out = coupled_heads(ctx, node, args[:3])
    bias = ctx.label_of(mask)
    mask_shape = shape_of(mask) or ()
    if bias is not None:
        # A bias per head (Swin's relative position bias, gathered from a parameter table):
        # one entry per query head, removed with it.
        if bias.dim != out.dim or bias.unit != 1 or bias.inner != 1:
            raise Blocked(f"{node.name} adds a bias whose heads do not line up")
        ctx.link_kv(out, bias, node.name)
    elif (
        isinstance(mask, fx.Node)
        and len(mask_shape) == rank_of(args[0])
        and static_size(mask_shape[out.dim]) != 1
    ):
        raise Blocked(f"{node.name} adds a bias with one slice per head")
    return out


def find_mha(gm: fx.GraphModule) -> tuple[list[MhaMatch], set[fx.Node]]:
    """The MultiheadAttention blocks of ``gm``, and the nodes inside them."""
    matches = []
    internal: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and packet(node) == "linear":
            match = match_mha(node)
            if match is not None:
                matches.append(match)
                internal |= match.internal
    return matches, internal


def attach_mha(ctx: Analyzer, m: MhaMatch) -> None:
    """q, k, v of a MultiheadAttention lose the same heads; out_proj loses their columns."""
    label = ctx.result_of(m.in_proj)
    if not isinstance(label, Label) or len(ctx.leaves(label.spaces)) != 1:
        return
    (space,) = ctx.leaves(label.spaces)
    q, k, v = ctx.split_space(space, [m.channels] * 3, m.in_proj, label.dim)
    for part in (q, k, v):
        ctx.set_head_size(part, m.head_size)
    ctx.union(Label(0, (q,), 1, m.head_size), Label(0, (k,), 1, m.head_size), "attention")
    ctx.union(Label(0, (q,), 1, m.head_size), Label(0, (v,), 1, m.head_size), "attention")
    ctx.member(m.out_proj.args[1], 1, Label(1, (v,)), "in")
    heads = Label(1, (q,), 1, m.head_size)
    ctx.rewrite(m.unflatten, 2, 1, Label(0, (q,)))
    for (view, batch_heads), back in zip(m.fold, m.unfold, strict=True):
        if isinstance(batch_heads, fx.Node):
            ctx.rewrite(batch_heads, 1, None, heads)
        else:
            factor = const_int(batch_heads) // m.heads
            ctx.rewrite(view, 1, 1, heads, factor)
        ctx.rewrite(back, 1, 1, heads)
    ctx.rewrite(m.merge, 1, 1, Label(1, (v,)))
