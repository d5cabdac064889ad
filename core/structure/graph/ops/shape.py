"""Shape ops: permutes, transposes, (un)squeezes, select/slice, expand, cat, split and reshapes.

They move the channel dimension, concatenate channel spaces side by side, split a space into
parts (q/k/v, GLU halves), flatten channels with what follows them or split them into heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import fx

from core.structure.graph.model import Label, NodeLabel, Parts
from core.structure.graph.nodes import (
    Blocked,
    args_of,
    const_int,
    nodes_in,
    norm_dim,
    packet,
    prefix_match,
    rank_of,
    same_size,
    shape_of,
    static_size,
)
from core.structure.graph.registry import register_op

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer

RESHAPE = ("reshape", "view", "_unsafe_view", "flatten", "unflatten")
SPLIT = ("chunk", "split", "split_with_sizes", "unbind")
# Ops that copy a tensor unchanged (between a constant and its use).
_COPIES = ("lift_fresh_copy", "detach", "detach_", "clone", "alias", "contiguous", "_to_copy")


@register_op("getitem")
def getitem(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """An element of a tuple output (a split's part, max_pool's values)."""
    source = ctx.result_of(args_of(node)[0])
    if isinstance(source, tuple):
        return source[int(args_of(node)[1])]
    if source is not None:
        raise Blocked(f"indexing into {node.name}")
    return None


@register_op("sym_size")
def sym_size(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    label = ctx.label_of(args_of(node)[0])
    if (
        label is not None
        and norm_dim(int(args_of(node)[1]), rank_of(args_of(node)[0])) == label.dim
    ):
        raise Blocked(f"{node.name} reads the channel count")
    return None


def _parts_of(ctx: Analyzer, node: object) -> Parts | None:
    """Stacked q/k/v parts (see :class:`Parts`) when ``node`` carries them."""
    label = ctx.result_of(node)
    return label if isinstance(label, Parts) else None


def _remap(label: NodeLabel, where: Callable[[int], int]) -> NodeLabel:
    """``label`` (or each stacked part) with its dims sent through ``where``."""
    if isinstance(label, Label):
        return label.moved(where(label.dim))
    if isinstance(label, Parts):
        return Parts(where(label.dim), tuple(lab.moved(where(lab.dim)) for lab in label.labels))
    return None


def _drop(label: Label, dim: int) -> Label:
    """``label`` once dimension ``dim`` (not its own) is gone."""
    return label.moved(label.dim - 1) if label.dim > dim else label


@register_op("permute")
def permute(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    label = _parts_of(ctx, args_of(node)[0]) or ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    rank = rank_of(args_of(node)[0])
    dims = [norm_dim(const_int(d), rank) for d in args_of(node)[1]]
    return _remap(label, dims.index)


@register_op("transpose")
def transpose(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    label = _parts_of(ctx, args_of(node)[0]) or ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    rank = rank_of(args_of(node)[0])
    a, b = (norm_dim(const_int(d), rank) for d in args_of(node)[1:3])
    return _remap(label, lambda d: b if d == a else a if d == b else d)


@register_op("t")
def t(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    return None if label is None else label.moved(1 - label.dim)


@register_op("numpy_T")
def numpy_t(ctx: Analyzer, node: fx.Node) -> Label | None:
    """``x.T``: every dimension reversed (Falcon's ``FalconLinear`` reads its weight as ``W.T``)."""
    label = ctx.label_of(args_of(node)[0])
    return None if label is None else label.moved(rank_of(args_of(node)[0]) - 1 - label.dim)


@register_op("unsqueeze")
def unsqueeze(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    dim = norm_dim(const_int(args_of(node)[1]), rank_of(args_of(node)[0]) + 1)
    return label.moved(label.dim + 1) if dim <= label.dim else label


@register_op("squeeze")
def squeeze(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    shape = shape_of(args_of(node)[0]) or ()
    rank = len(shape)
    if len(args_of(node)) < 2:
        dims = [i for i, s in enumerate(shape) if static_size(s) == 1]
    else:
        raw = args_of(node)[1]
        dims = [
            norm_dim(const_int(d), rank) for d in (raw if isinstance(raw, (list, tuple)) else [raw])
        ]
        dims = [d for d in dims if static_size(shape[d]) == 1]
    if label.dim in dims:
        raise Blocked(f"{node.name} squeezes the channel dimension")
    return label.moved(label.dim - sum(1 for d in dims if d < label.dim))


@register_op("select")
def select(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    parts = _parts_of(ctx, args_of(node)[0])
    if parts is not None:
        return _pick_parts(node, parts)
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    dim = norm_dim(const_int(args_of(node)[1]), rank_of(args_of(node)[0]))
    if dim == label.dim:
        raise Blocked(f"{node.name} picks single channels")
    return label.moved(label.dim - 1) if dim < label.dim else label


@register_op("slice")
def slice_(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    dim = norm_dim(
        const_int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, rank_of(args_of(node)[0])
    )
    if dim == label.dim and shape_of(node) != shape_of(args_of(node)[0]):
        return _slice_part(ctx, node, label, dim)
    return label


def _slice_part(ctx: Analyzer, node: fx.Node, label: Label, dim: int) -> Label:
    """Slices that tile the channels (Phi-3's fused qkv: ``[:q]``, ``[q:q+kv]``, ``[q+kv:]``)
    split them like ``split`` does; each slice's bounds follow the kept counts before it."""
    source = args_of(node)[0]
    assert isinstance(source, fx.Node)
    key = ("slices", source.name)
    if key not in ctx.memo:
        ctx.memo[key] = _tile(ctx, source, label, dim)
    parts = ctx.memo[key]
    if not isinstance(parts, dict) or node.name not in parts:
        raise Blocked(f"{node.name} slices the channels")
    position, children = parts[node.name]
    if position:
        ctx.rewrite(node, 2, None, Label(dim, children[:position]))
    end = args_of(node)[3] if len(args_of(node)) > 3 else None
    if isinstance(end, int) and end < sum(ctx.space(c).size for c in children):
        ctx.rewrite(node, 3, None, Label(dim, children[: position + 1]))
    return Label(dim, (children[position],))


def _tile(
    ctx: Analyzer, source: fx.Node, label: Label, dim: int
) -> dict[str, tuple[int, tuple[int, ...]]] | None:
    """slice user -> (its position, the parts) when ``source``'s slices along the channels
    cover them exactly once; None otherwise."""
    spaces = ctx.leaves(label.spaces)
    if len(spaces) != 1 or label.inner != 1 or label.unit != 1 or ctx.is_coupled(spaces[0]):
        return None
    size = ctx.space(spaces[0]).size
    bounds: list[tuple[int, int, fx.Node]] = []
    rank = rank_of(source)
    for user in source.users:
        args = args_of(user)
        if packet(user) != "slice" or norm_dim(const_int(args[1]), rank) != dim:
            continue
        start, end = (args[2] if len(args) > 2 else 0), (args[3] if len(args) > 3 else size)
        step = args[4] if len(args) > 4 else 1
        if not isinstance(start, int) or not isinstance(end, int) or step != 1:
            return None
        bounds.append((start, min(end, size), user))
    bounds.sort(key=lambda b: b[0])
    edges = [b[0] for b in bounds] + [bounds[-1][1]] if bounds else []
    if not bounds or edges[0] != 0 or edges[-1] != size:
        return None
    if any(bounds[i][1] != bounds[i + 1][0] for i in range(len(bounds) - 1)):
        return None
    sizes = [end - start for start, end, _ in bounds]
    children = ctx.split_space(spaces[0], sizes, source, dim)
    return {user.name: (i, children) for i, (_, _, user) in enumerate(bounds)}


@register_op("expand")
def expand(ctx: Analyzer, node: fx.Node) -> Label | None:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    out_rank = len(args_of(node)[1])
    moved = label.moved(out_rank - rank_of(args_of(node)[0]) + label.dim)
    size = args_of(node)[1][moved.dim]
    before = static_size((shape_of(args_of(node)[0]) or ())[label.dim])
    copies = static_size((shape_of(node) or ())[moved.dim])
    if label.unit > 1 and before == 1 and copies is not None and copies > 1:
        # One head broadcast to several (multi-query keys and values): copies of it.
        moved = Label(moved.dim, label.spaces, label.inner, label.unit, label.repeat * copies)
    if isinstance(size, int) and size != -1:
        ctx.rewrite(node, 1, moved.dim, moved)
    elif isinstance(size, fx.Node):
        raise Blocked(f"{node.name} expands to a computed channel count")
    return moved


@register_op("expand_as")
def expand_as(ctx: Analyzer, node: fx.Node) -> Label | None:
    """``x.expand_as(y)``: ``x`` broadcast to ``y``'s shape (``F.normalize``'s norm); the
    channels are ``x``'s, and ``y``'s where it has them, coupled."""
    x, other = args_of(node)[:2]
    label, target = ctx.label_of(x), ctx.label_of(other)
    out = shape_of(node) or ()
    if label is not None:
        label = label.moved(len(out) - rank_of(x) + label.dim)
        if static_size((shape_of(x) or ())[label.dim - len(out) + rank_of(x)]) != static_size(
            out[label.dim]
        ):
            raise Blocked(f"{node.name} expands the channel dimension")
    if label is not None and target is not None:
        if label.dim != target.dim:
            raise Blocked(f"{node.name} expands channels onto others on another dimension")
        ctx.union(label, target, node.name)
    return label


@register_op("stack")
def stack(ctx: Analyzer, node: fx.Node) -> Label | None:
    """Tensors stacked along a new dim (GPT-J's rotary ``stack((-x2, x1), dim=-1)``): their
    channels couple and move past the new dim."""
    tensors = list(args_of(node)[0])
    labels = [ctx.label_of(t) for t in tensors]
    if all(lab is None for lab in labels):
        return None
    if any(lab is None for lab in labels):
        raise Blocked(f"{node.name} stacks channels with an untracked tensor")
    known = [lab for lab in labels if lab is not None]
    dim = norm_dim(
        const_int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, rank_of(tensors[0]) + 1
    )
    for lab in known[1:]:
        if lab.dim != known[0].dim:
            raise Blocked(f"{node.name} stacks channels on different dimensions")
        ctx.union(known[0], lab, node.name)
    return known[0].moved(known[0].dim + 1) if dim <= known[0].dim else known[0]


@register_op("cat", "concat")
def cat(ctx: Analyzer, node: fx.Node) -> Label | None:
    tensors = list(args_of(node)[0])
    rank = rank_of(tensors[0])
    dim = norm_dim(const_int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, rank)
    labels = [ctx.label_of(t) for t in tensors]
    if all(lab is None for lab in labels):
        return None
    first = next(lab for lab in labels if lab is not None)
    if dim == first.dim and first.inner == 1 and first.unit == 1:
        # An untracked tensor (a model input, say) joins with channels that all stay.
        for i, lab in enumerate(labels):
            if lab is None:
                size = static_size((shape_of(tensors[i]) or ())[dim])
                if size is None:
                    raise Blocked(f"{node.name} concatenates a tensor of unknown width")
                fixed = ctx.new_space(size, tensors[i].name, node, dim)
                ctx.block(fixed, f"{tensors[i].name} is not produced by a prunable layer")
                labels[i] = fixed
    elif dim != first.dim:
        # Along another dim (a class token joining the patch tokens): a parameter, maybe
        # expanded over the batch, is sliced with the channels.
        for i, lab in enumerate(labels):
            if lab is None and _param_operand(ctx, node, tensors[i], first):
                labels[i] = first
    if any(lab is None for lab in labels):
        raise Blocked(f"{node.name} concatenates channels with an untracked tensor")
    known = [lab for lab in labels if lab is not None]
    if dim == known[0].dim:
        if any(
            lab.dim != dim or lab.inner != known[0].inner or lab.unit != known[0].unit
            for lab in known
        ):
            raise Blocked(f"{node.name} concatenates channels of different layouts")
        spaces = tuple(s for lab in known for s in lab.spaces)
        return Label(dim, spaces, known[0].inner, known[0].unit)
    for lab in known[1:]:
        if lab.dim != known[0].dim:
            raise Blocked(f"{node.name} concatenates channels on different dimensions")
        ctx.union(known[0], lab, node.name)
    return known[0]


def _param_operand(ctx: Analyzer, node: fx.Node, tensor: object, label: Label) -> bool:
    """Make a parameter (or ``expand`` of one) a member sliced like ``label``; False when
    ``tensor`` is neither."""
    if not isinstance(tensor, fx.Node):
        return False
    if [static_size(s) for s in shape_of(tensor) or (1,)] == [0]:
        return True  # a 1-D empty tensor, which cat skips whatever the other shapes
    source, expanded = tensor, None
    if (
        tensor.op == "call_function"
        and packet(tensor) == "expand"
        and not tensor.users.keys() - {node}
    ):
        source, expanded = args_of(tensor)[0], tensor
    # A key/value cache that transformers lifts into the program as a constant, copied before it
    # is concatenated with the new keys: the constant is sliced with the heads.
    while (
        isinstance(source, fx.Node)
        and source.op == "call_function"
        and packet(source) in _COPIES
        and len(source.users) == 1
    ):
        source = args_of(source)[0]
    if ctx.param(source) is None:
        return False
    rank = len(shape_of(tensor) or ())
    pos = label.dim - (rank - len(shape_of(source) or ()))
    if pos < 0:
        return False
    ctx.member(source, pos, label.moved(pos), "param")
    if expanded is not None:
        size = args_of(expanded)[1][label.dim]
        if isinstance(size, fx.Node):
            raise Blocked(f"{expanded.name} expands to a computed channel count")
        if isinstance(size, int) and size != -1:
            ctx.rewrite(expanded, 1, label.dim, label)
    return True


@register_op("index")
def index(ctx: Analyzer, node: fx.Node) -> Label | None:
    """``table[idx]``: rows gathered from a tensor whose channels are its columns (a relative
    position bias table, one column per head; see :func:`gathered_tables`) keep them."""
    args = args_of(node)
    source, indices = args[0], args[1] if len(args) > 1 else None
    label = ctx.label_of(source)
    others = [n for n in nodes_in((args[1:], node.kwargs)) if ctx.result_of(n) is not None]
    if label is not None and not others and isinstance(indices, (list, tuple)):
        gathered = [i for i in indices if i is not None]
        if len(indices) == 1 and len(gathered) == 1 and label.dim >= 1:
            # Only dim 0 is indexed: the index's dims replace it.
            return label.moved(label.dim - 1 + rank_of(gathered[0]))
    if label is not None or others:
        raise Blocked(f"{node.name} indexes with or into channels")
    ctx.freeze_params(node, f"{node.name} gathers from it")
    return None


# Ops that move, resize or join a table's rows and keep its columns apart.
_TABLE_LAYOUT = (
    *RESHAPE, *_COPIES, "permute", "transpose", "slice", "cat", "concat", "unsqueeze", "squeeze",
    "upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "to",
)  # fmt: skip


def gathered_tables(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """2-D parameters that only layout ops turn into what ``index`` gathers rows from: a
    relative position bias table, one column per head (Swin gathers from the parameter itself;
    BEiT first interpolates it and appends its class-token rows). Each -> its columns.

    With head pruning their columns start a space at the parameter, so the heads the gathered
    bias is added to can take their columns with them through whatever reshapes them. A table
    computed otherwise (Swin V2's MLP over coordinates) starts its space where a layer makes it."""
    tables: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or packet(node) != "index" or not _biases_scores(node):
            continue
        found: list[fx.Node] = []
        todo, seen = [node.args[0]], set()
        while todo:
            item = todo.pop()
            if not isinstance(item, fx.Node) or item in seen:
                continue
            seen.add(item)
            if item.op == "placeholder" or (
                item.op == "call_function" and packet(item) not in _TABLE_LAYOUT
            ):
                found = []  # computed, not moved: not a table
                break
            if item.op == "get_attr":
                shape = shape_of(item) or ()
                if len(shape) == 2 and static_size(shape[1]) is not None:
                    found.append(item)
                continue
            todo.extend(nodes_in((args_of(item), item.kwargs)))
        for table in found:
            tables[table] = int(shape_of(table)[1])  # type: ignore[index]
    return tables


def _biases_scores(node: fx.Node) -> bool:
    """Whether what ``node`` gathers, moved and added to, reaches attention scores (SDPA's mask
    or a softmax): a position bias, not a rotary table (GPT-J gathers its sines and cosines)."""
    todo, seen = [node], set()
    while todo:
        item = todo.pop()
        for user in item.users:
            op = packet(user)
            if op in ("scaled_dot_product_attention", "softmax", "_softmax"):
                return True
            if user not in seen and (op in _TABLE_LAYOUT or op in ("add", "expand")):
                seen.add(user)
                todo.append(user)
    return False


def start_table(ctx: Analyzer, node: fx.Node, columns: int) -> Label:
    """A gathered table's columns: a space of their own, sliced with the heads they meet."""
    name = str(ctx.param(node))
    out = ctx.new_space(columns, name.removesuffix(".weight"), node, 1)
    ctx.member(node, 1, out, "param")
    return out


def _pick_parts(node: fx.Node, parts: Parts) -> NodeLabel:
    """``qkv[i]`` (select) or ``qkv.unbind(d)`` along the stacked parts: q, k and v apart."""
    args = args_of(node)
    dim_arg = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    dim = norm_dim(const_int(dim_arg), rank_of(args[0]))
    if dim != parts.dim:
        raise Blocked(f"{node.name} takes stacked q, k and v apart along another dimension")
    labels = tuple(_drop(lab, dim) for lab in parts.labels)
    if packet(node) == "unbind":
        return labels
    index = const_int(args[2])
    return labels[index + len(labels) if index < 0 else index]


@register_op(*SPLIT)
def split_channels(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    """chunk/split/unbind: along the channels each part becomes a space of its own."""
    parts = _parts_of(ctx, args_of(node)[0])
    if parts is not None:
        if packet(node) != "unbind":
            raise Blocked(f"{node.name} splits stacked q, k and v")
        return _pick_parts(node, parts)
    label = ctx.label_of(args_of(node)[0])
    val = node.meta.get("val")
    count = len(val) if isinstance(val, (list, tuple)) else 0
    if label is None:
        return tuple([None] * count) if count else None
    at = 1 if packet(node) == "unbind" else 2  # unbind(x, dim); chunk/split(x, n, dim)
    dim_arg = args_of(node)[at] if len(args_of(node)) > at else node.kwargs.get("dim", 0)
    dim = norm_dim(const_int(dim_arg), rank_of(args_of(node)[0]))
    if dim == label.dim:
        return _split_space(ctx, node, label, val)
    # Along another dim every part keeps the channels; unbind removes that dim.
    return tuple([_drop(label, dim) if packet(node) == "unbind" else label] * count)


def _split_space(ctx: Analyzer, node: fx.Node, label: Label, parts: Any) -> tuple[Label, ...]:
    """Chunk along the channels (q/k/v, GLU halves): each part becomes a space of its own.

    Along a heads dim the parts are whole heads (Falcon's multi-query ``split([H, 1, 1])`` of
    its fused heads into the queries, the key and the value)."""
    spaces = ctx.leaves(label.spaces)
    if len(spaces) != 1 or label.inner != 1 or label.repeat != 1:
        raise Blocked(f"{node.name} splits concatenated or flattened channels")
    (space,) = spaces
    if ctx.is_coupled(space):
        raise Blocked(f"{node.name} splits channels already coupled to others")
    sizes = [static_size(p.shape[label.dim]) for p in parts]
    widths = [int(size or 0) * label.unit for size in sizes]
    if any(size is None for size in sizes) or sum(widths) != ctx.space(space).size:
        raise Blocked(f"{node.name} splits the channels into parts of unknown size")
    children = ctx.split_space(space, widths, node, label.dim)
    for child in children if label.unit > 1 else ():
        ctx.set_head_size(child, label.unit)
    labels = tuple(Label(label.dim, (c,), 1, label.unit) for c in children)
    op, args = packet(node), args_of(node)
    if op == "split_with_sizes":
        for i, part in enumerate(labels):
            ctx.rewrite(node, 1, i, part)
        return labels
    # chunk, unbind and split by one size cut equal parts: they must stay equal.
    for part in labels[1:]:
        ctx.union(labels[0], part, node.name)
    if op == "split":
        if not isinstance(args[1], int):
            raise Blocked(f"{node.name} splits the channels by computed sizes")
        ctx.rewrite(node, 1, None, labels[0])
    return labels


@register_op(*RESHAPE)
def reshape(ctx: Analyzer, node: fx.Node) -> NodeLabel:
    label = ctx.label_of(args_of(node)[0])
    if label is None:
        return None
    src, out = shape_of(args_of(node)[0]), shape_of(node)
    if src is None or out is None:
        raise Blocked(f"{node.name} reshapes a tensor of unknown shape")
    d = label.dim
    k = prefix_match(src[:d], out)
    if ctx.heads:
        k = _inferred_heads(node, out, k, d)
    if k is None or k >= len(out):
        if label.unit > 1 and prefix_match(src[: d + 1], out) is not None:
            # BLOOM's (B, H, N, D) -> (B*H, N, D); only nn.MultiheadAttention's is followed.
            raise Blocked(f"{node.name} folds the heads into the batch dimension")
        raise Blocked(f"{node.name} moves the channels across other dimensions")
    op = packet(node)
    j = d + 1
    while j <= len(src):
        if same_size(src[d:j], [out[k]]):
            # The channel dim is kept (j = d+1) or flattened with what follows it.
            trailing = math.prod(int(s) for s in src[d + 1 : j])
            if label.unit > 1:
                # Heads merged back with their channels: (H, D) -> H*D.
                if j == d + 1:
                    new = label.moved(k)
                elif _broadcast_copies(node, d + 1, j):
                    # repeat_kv: (KV, n_rep) copies of each key/value head -> KV * n_rep heads.
                    new = Label(k, label.spaces, label.inner, label.unit, label.repeat * trailing)
                    _repeat_sites(ctx, node, d + 1, j, new)
                elif trailing == label.unit and label.inner == 1 and label.repeat == 1:
                    new = Label(k, label.spaces)
                elif label.inner == 1 and label.unit % (trailing * label.repeat) == 0:
                    new = _merge_fused_heads(ctx, node, label, src, d, j, k, trailing)
                else:
                    raise Blocked(f"{node.name} merges heads with other dimensions")
            else:
                new = Label(k, label.spaces, label.inner * trailing)
            _rewrite_size(ctx, node, op, k, new)
            return new
        j += 1
    head = _split_heads(ctx, node, label, src[d], out, k)
    if head is not None:
        _rewrite_size(ctx, node, op, k, head)
        return head
    parts = _split_parts(ctx, node, label, src[d], out, k)
    if parts is not None:
        _rewrite_size(ctx, node, op, k + 1, parts.labels[0])
        return parts
    # The channel dimension is split; fine while only the inner part splits off.
    for e in range(k + 1, len(out) + 1):
        if same_size(out[k:e], [src[d]]):
            tail = [static_size(s) for s in out[k + 1 : e]]
            if any(t is None for t in tail):
                break
            split = math.prod(t for t in tail if t is not None)
            if label.unit > 1 and label.inner == 1 and label.repeat == 1 and split > 1:
                new = _group_heads(ctx, node, label, k, split)
                _rewrite_size(ctx, node, op, k, new)
                return new
            if label.inner % split == 0:
                new = Label(k, label.spaces, label.inner // split)
                _rewrite_size(ctx, node, op, k, new)
                return new
            break
    raise Blocked(f"{node.name} splits the channels (attention heads are `head` pruning)")


def _inferred_heads(node: fx.Node, out: Sequence[object], k: int | None, d: int) -> int | None:
    """``view(B, N, -1, D)`` of ``D`` channels (one key/value head of multi-query attention):
    the size-1 dim the view infers is a count of heads split off the channels, not a dim that
    goes with the prefix as :func:`prefix_match` (which gives ``k``) would take it. Where the
    prefix really ends."""
    sizes = args_of(node)[1] if packet(node) in ("reshape", "view") else None
    if k is None or not isinstance(sizes, (list, tuple)) or len(sizes) != len(out):
        return k
    while k > d and static_size(out[k - 1]) == 1 and sizes[k - 1] == -1:
        k -= 1
    return k


def _group_heads(ctx: Analyzer, node: fx.Node, label: Label, k: int, split: int) -> Label:
    """(.., H*g, D) -> (.., H, g, D): consecutive heads grouped into one of ``g`` times their size.

    Fused projections that interleave q, k and v per head: Falcon splits its output into heads
    of D, then regroups each head's q, k and v (``unflatten(-2, (H, 3))``) or each key/value
    group's queries, key and value (``view(.., KV, r + 2, D)``). The new dim indexes whole
    groups, which are what can go; the ``g`` dim is inside them."""
    unit = label.unit * split
    for s in ctx.leaves(label.spaces):
        if ctx.space(s).size % unit:
            raise Blocked(f"{node.name} groups heads that do not divide the channels")
        ctx.set_head_size(s, unit)
    return Label(k, label.spaces, 1, unit)


def _merge_fused_heads(
    ctx: Analyzer,
    node: fx.Node,
    label: Label,
    src: Sequence[object],
    d: int,
    j: int,
    k: int,
    trailing: int,
) -> Label:
    """Heads of a fused projection merged with dims inside them, where each head carries only a
    part of its channels (q, k and v interleaved per head: GPT-NeoX's ``(H, 3*D)`` chunked into
    three ``(H, D)``).

    Merged with the innermost dims, these are new channels (``H*D``, what the output projection
    reads): a space of their own that loses head ``h``'s ``D`` channels when the fused heads lose
    head ``h``. Merged with a dim that is not the last (Falcon's ``(KV, r, D) -> (KV*r, D)``), they
    are still heads: ``repeat`` positions of the new dim per fused head."""
    if j < len(src):
        return Label(k, label.spaces, 1, label.unit, label.repeat * trailing)
    heads = static_size(src[d])
    if heads is None:
        raise Blocked(f"{node.name} merges an unknown number of heads")
    width = trailing * label.repeat  # channels each fused head leaves here
    merged = ctx.new_space(heads * trailing, ctx.space(label.spaces[0]).producer, node, k)
    (space,) = merged.spaces
    ctx.set_head_size(space, width)
    ctx.link_kv(label, Label(k, merged.spaces, 1, width), node.name)
    return merged


def _repeat_sites(ctx: Analyzer, node: fx.Node, start: int, stop: int, label: Label) -> None:
    """repeat_kv's ``expand`` size of the one broadcast dim ``start`` (``stop = start + 1``): the
    repeats of ``label``'s heads, which no rewrite of the heads dim holds."""
    expanded = args_of(node)[0]
    sizes = args_of(expanded)[1] if isinstance(expanded, fx.Node) else None
    if stop == start + 1 and isinstance(sizes, (list, tuple)) and isinstance(sizes[start], int):
        assert isinstance(expanded, fx.Node)
        ctx.repeat_site(expanded, 1, start, label)


def _broadcast_copies(node: fx.Node, start: int, stop: int) -> bool:
    """Whether dims ``start:stop`` of ``node``'s input are an ``expand`` of size-1 dims: every
    position along them holds the same values (``repeat_kv``'s ``expand`` before its reshape)."""
    source = args_of(node)[0]
    if not isinstance(source, fx.Node) or packet(source) != "expand":
        return False
    before = shape_of(args_of(source)[0]) or ()
    offset = len(shape_of(source) or ()) - len(before)
    dims = [d - offset for d in range(start, stop)]
    return all(d >= 0 and static_size(before[d]) == 1 for d in dims)


def _split_heads(
    ctx: Analyzer, node: fx.Node, label: Label, size: object, out: Sequence[object], k: int
) -> Label | None:
    """(.., C, ..) -> (.., H, D, ..): with head pruning, a label over the H heads.

    Also (.., H, P, D, ..) when every user picks along P: BLOOM's ``view(B, N, H, 3, D)``, q, k
    and v interleaved per head, taken apart by ``[..., i, :]`` (timm's ``(3, H, D)`` is picked
    apart along its first dim instead: see :func:`_split_parts`)."""
    if not ctx.heads or label.inner != 1 or label.unit != 1 or k + 2 > len(out):
        return None
    if same_size([out[k], out[k + 1]], [size]):
        head_size = static_size(out[k + 1])
    elif k + 3 <= len(out) and same_size(out[k : k + 3], [size]) and _picked_along(node, k + 1):
        inside = [static_size(s) for s in out[k + 1 : k + 3]]
        head_size = None if None in inside else math.prod(s for s in inside if s is not None)
    else:
        return None
    if head_size is None:
        return None
    for s in ctx.leaves(label.spaces):
        if ctx.space(s).size % head_size or ctx.head_size(s) not in (None, head_size):
            raise Blocked(f"{node.name} splits channels into heads of different sizes")
        ctx.set_head_size(s, head_size)
    return Label(k, label.spaces, 1, head_size)


def _picked_along(node: fx.Node, dim: int) -> bool:
    """Whether every user of ``node`` takes it apart along ``dim`` (select, slice or unbind)."""
    rank = len(shape_of(node) or ())
    for user in node.users:
        args = args_of(user)
        if packet(user) not in ("select", "slice", "unbind") or len(args) < 2:
            return False
        if not isinstance(args[1], int) or norm_dim(args[1], rank) != dim:
            return False
    return bool(node.users)


def _split_parts(
    ctx: Analyzer, node: fx.Node, label: Label, size: object, out: Sequence[object], k: int
) -> Parts | None:
    """(.., P*C, ..) -> (.., P, H, D, ..): timm's fused ``qkv(x).reshape(B, N, 3, H, D)``. With
    head pruning the channels split into P equal parts (q, k, v) like ``chunk`` splits them;
    each part's heads sit on the H dimension, and H is the kept head count of every part."""
    if not ctx.heads or label.inner != 1 or label.unit != 1 or k + 3 > len(out):
        return None
    count, head_size = static_size(out[k]), static_size(out[k + 2])
    if count is None or head_size is None or not same_size(out[k : k + 3], [size]):
        return None
    spaces = ctx.leaves(label.spaces)
    if len(spaces) != 1:
        raise Blocked(f"{node.name} splits concatenated channels into q, k and v")
    (space,) = spaces
    if ctx.is_coupled(space):
        raise Blocked(f"{node.name} splits channels already coupled to others")
    width = ctx.space(space).size // count
    if width % head_size:
        raise Blocked(f"{node.name} splits channels into heads of different sizes")
    children = ctx.split_space(space, [width] * count, node, k)
    labels = []
    for child in children:
        ctx.set_head_size(child, head_size)
        labels.append(Label(k + 1, (child,), 1, head_size))
    # H is one constant for every part, so they must lose the same heads.
    for part in labels[1:]:
        ctx.union(labels[0], part, node.name)
    return Parts(k, tuple(labels))


def _rewrite_size(ctx: Analyzer, node: fx.Node, op: str, k: int, label: Label) -> None:
    if op in ("reshape", "view", "_unsafe_view"):
        size = args_of(node)[1][k]
        if isinstance(size, int) and size != -1:
            ctx.rewrite(node, 1, k, label)
        elif isinstance(size, fx.Node):
            raise Blocked(f"{node.name} reshapes to a computed channel count")
    elif op == "unflatten":
        start = norm_dim(const_int(args_of(node)[1]), rank_of(args_of(node)[0]))
        sizes = args_of(node)[2]
        if start <= k < start + len(sizes):
            size = sizes[k - start]
            if isinstance(size, int) and size != -1:
                ctx.rewrite(node, 2, k - start, label)
            elif isinstance(size, fx.Node):
                raise Blocked(f"{node.name} reshapes to a computed channel count")
