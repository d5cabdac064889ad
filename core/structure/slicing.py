"""Physically remove channels: slice parameters/buffers, rewrite size constants, re-export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from core.errors import PruningError
from core.structure.graph import GraphAnalysis, Label, Member


def label_indices(
    label: Label, kept: Mapping[int, torch.Tensor], sizes: Mapping[int, int]
) -> torch.Tensor:
    """Positions along ``label.dim`` that survive, given kept channel indices per space."""
    parts = []
    offset = 0
    for space in label.spaces:
        keep = kept.get(space)
        parts.append(offset + (keep if keep is not None else torch.arange(sizes[space])))
        offset += sizes[space]
    channels = torch.cat(parts)
    if label.unit > 1:
        # A heads dimension: whole heads are kept, so every unit-th kept channel starts one.
        heads = channels[:: label.unit] // label.unit
        if label.repeat == 1:
            return heads
        # Key/value heads repeated for grouped-query attention: each kept head's copies.
        return (heads[:, None] * label.repeat + torch.arange(label.repeat)[None, :]).reshape(-1)
    if label.inner == 1:
        return channels
    return (channels[:, None] * label.inner + torch.arange(label.inner)[None, :]).reshape(-1)


def kept_by_space(
    analysis: GraphAnalysis, keep: Mapping[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Kept channel indices of every space whose group loses channels (``keep``: group -> mask)."""
    out: dict[int, torch.Tensor] = {}
    for space in analysis.spaces:
        root = analysis.root_of.get(space.id)  # None: split into parts, which carry the masks
        mask = keep.get(root) if root is not None else None
        if mask is not None and not bool(mask.all()):
            out[space.id] = torch.nonzero(mask).flatten()
    return out


def grouped_positions(member: Member, index: torch.Tensor, channels: int) -> torch.Tensor:
    """Kept positions inside each block of a grouped weight's input dim: ``(groups, kept)``.

    ``index`` holds the kept input channels (of ``channels``); every block keeps as many.
    """
    per_block = channels // member.groups
    block_of = index // per_block
    counts = torch.bincount(block_of, minlength=member.groups)
    if not bool((counts == counts[0]).all()):
        raise PruningError(f"{member.target}: grouped convolution blocks would lose unequal counts")
    return (index - block_of * per_block).reshape(member.groups, -1)


def _grouped_rows(tensor: torch.Tensor, member: Member, positions: torch.Tensor) -> torch.Tensor:
    """Row o of a grouped weight keeps the positions of its own block."""
    rows = tensor.shape[0]
    block = torch.arange(rows) // (rows // member.groups)
    index = positions[block]  # (rows, kept)
    index = index.reshape(*index.shape, *([1] * (tensor.dim() - 2)))
    return tensor.gather(1, index.expand(-1, -1, *tensor.shape[2:]))


def slice_member(
    tensor: torch.Tensor, member: Member, index: torch.Tensor, sizes: Mapping[int, int]
) -> torch.Tensor:
    """``tensor`` without the removed channels of ``member`` (``index``: the kept positions)."""
    if member.role == "grouped_in":
        channels = sum(sizes[s] for s in member.label.spaces)
        return _grouped_rows(tensor, member, grouped_positions(member, index, channels))
    return tensor.index_select(member.dim, index)


def ordered_members(analysis: GraphAnalysis) -> list[Member]:
    """Every member once; grouped input dims first, since which block a row reads is known only
    before rows are removed."""
    members = {(m.target, m.dim): m for g in analysis.groups for m in g.members}
    return sorted(members.values(), key=lambda m: m.role != "grouped_in")


def _set_tensor(
    gm: fx.GraphModule, target: str, value: torch.Tensor, analysis: GraphAnalysis
) -> None:
    """Put ``value`` in place of ``target`` under every name the tensor goes by, as one object:
    tied tensors stay tied, so the re-exported program holds them once."""
    new: torch.Tensor | None = None
    for name in analysis.names_of(target):
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            if new is None:
                old = owner._parameters[attr]
                requires_grad = bool(old.requires_grad) if old is not None else False
                new = nn.Parameter(value, requires_grad=requires_grad)
            owner._parameters[attr] = new  # type: ignore[assignment]
        elif attr in owner._buffers:
            owner._buffers[attr] = new if new is not None else value
        else:
            setattr(owner, attr, new if new is not None else value)


def _get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, name)
    assert isinstance(value, torch.Tensor)
    return value


def apply_channels(
    gm: fx.GraphModule, analysis: GraphAnalysis, keep: Mapping[int, torch.Tensor]
) -> None:
    """Slice ``gm`` in place: every member of a group that loses channels, every size constant.

    ``keep`` maps a group id to a bool mask over its channels; groups not in it keep everything.
    """
    kept = kept_by_space(analysis, keep)
    if not kept:
        return
    sizes = {s.id: s.size for s in analysis.spaces}
    with torch.no_grad():
        for member in ordered_members(analysis):
            if not any(s in kept for s in member.label.spaces):
                continue
            tensor = _get_tensor(gm, member.target)
            index = label_indices(member.label, kept, sizes)
            # Contiguous whatever the original's layout: a strided weight would send every
            # linear/conv call of the smaller program down a slower kernel path.
            sliced = slice_member(tensor, member, index, sizes)
            _set_tensor(
                gm, member.target, sliced.clone(memory_format=torch.contiguous_format), analysis
            )
    by_name = {n.name: n for n in gm.graph.nodes}
    rewrites = {(r.node, r.arg, r.index): r for g in analysis.groups for r in g.rewrites}
    # A rewrite may name a non-tensor node (operator.mul computing B*H): found by name too.
    for (node_name, arg, position), rewrite in rewrites.items():
        if not any(s in kept for s in rewrite.label.spaces):
            continue
        node = by_name[node_name]
        value = len(label_indices(rewrite.label, kept, sizes)) * rewrite.factor
        args: list[Any] = list(node.args)
        if position is None:
            args[arg] = value
        else:
            sizes_arg = list(args[arg])
            sizes_arg[position] = value
            args[arg] = sizes_arg
        node.args = tuple(args)
    gm.recompile()


def mask_channels(
    gm: fx.GraphModule, analysis: GraphAnalysis, keep: Mapping[int, torch.Tensor]
) -> None:
    """Zero, in place, every weight that reads a removed channel (the masked-but-unshrunk model).

    The removed channels are still computed but nothing downstream sees them, which is what the
    sliced program computes too (up to LayerNorm statistics over the channels).
    """
    kept = kept_by_space(analysis, keep)
    sizes = {s.id: s.size for s in analysis.spaces}
    members = {
        (m.target, m.dim): m
        for g in analysis.groups
        for m in g.members
        if m.role in ("in", "grouped_in")
    }
    with torch.no_grad():
        for (target, dim), member in members.items():
            if not any(s in kept for s in member.label.spaces):
                continue
            tensor = _get_tensor(gm, target)
            index = label_indices(member.label, kept, sizes)
            if member.role == "grouped_in":
                channels = sum(sizes[s] for s in member.label.spaces)
                per_block = channels // member.groups
                alive = torch.zeros(channels, dtype=torch.bool)
                alive[index] = True
                rows = tensor.shape[0]
                block = torch.arange(rows) // (rows // member.groups)
                # Row o reads input channels block(o) * per_block + p, p < per_block.
                read = block[:, None] * per_block + torch.arange(per_block)[None, :]
                reads = alive[read].reshape(rows, per_block, *([1] * (tensor.dim() - 2)))
                _set_tensor(gm, target, tensor * reads.to(tensor.dtype), analysis)
                continue
            mask = torch.zeros(tensor.shape[dim], dtype=torch.bool)
            mask[index] = True
            shape = [1] * tensor.dim()
            shape[dim] = -1
            # A new tensor: the module's parameters share storage with the program's.
            _set_tensor(gm, target, tensor * mask.reshape(shape).to(tensor.dtype), analysis)


def verify(
    original: torch.export.ExportedProgram,
    pruned: torch.export.ExportedProgram,
    analysis: GraphAnalysis,
    keep: Mapping[int, torch.Tensor],
    *,
    exact: bool,
) -> None:
    """Check the smaller program against the original with the removed channels masked.

    With ``exact`` False (a LayerNorm renormalises over fewer channels, or a layer was refitted)
    only the output shapes must agree.

    Raises:
        PruningError: they disagree: a bug in the graph pass, caught before anyone gets the model.
    """
    reference = original.module()
    mask_channels(reference, analysis, keep)
    placeholders = [n for n in reference.graph.nodes if n.op == "placeholder"]
    args, kwargs = _example_inputs(original, placeholders)
    with torch.no_grad():
        expected = pytree.tree_leaves(reference(*args, **kwargs))
        got = pytree.tree_leaves(pruned.module()(*args, **kwargs))
    for a, b in zip(got, expected, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            raise PruningError(
                f"the smaller program's output has shape {list(a.shape)}, not "
                f"{list(b.shape)}; nothing was pruned (please report this model)"
            )
        if exact and a.is_floating_point():
            scale = float(b.abs().max()) if b.numel() else 1.0
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
                raise PruningError(
                    "the smaller program does not compute what the original computes with those "
                    "channels removed; nothing was pruned (please report this model)"
                )


def reexport(
    gm: fx.GraphModule, program: torch.export.ExportedProgram
) -> torch.export.ExportedProgram:
    """Export ``gm`` (a modified ``program.module()``) again, keeping the program's dynamic dims.

    Each symbolic input dimension becomes a ``Dim`` with the range the original program's
    ``range_constraints`` recorded: a bare ``Dim`` can fail where the original guards narrowed it.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims: dict[str, torch.export.Dim] = {}
    leaves: list[dict[int, object] | None] = []
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            leaves.append(None)
            continue
        spec: dict[int, object] = {}
        for i, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                raise PruningError(
                    f"input {node.name} dimension {i} is derived ({expr}); re-export supports "
                    "independent dynamic dimensions only"
                )
            name = str(expr)
            if name not in dims:
                bounds = program.range_constraints.get(expr)
                low = int(bounds.lower) if bounds is not None else 0
                high = bounds.upper if bounds is not None else None
                # An unbounded range is sympy's (int) infinity, which has no int().
                finite = high is not None and bool(getattr(high, "is_finite", False))
                dims[name] = torch.export.Dim(name, min=low, max=int(high) if finite else None)
            spec[i] = dims[name]
        leaves.append(spec or None)
    args, kwargs = _example_inputs(program, placeholders)
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        dynamic = pytree.tree_unflatten(leaves, in_spec)
        dynamic_args, dynamic_kwargs = dynamic
        if dynamic_kwargs:
            raise PruningError("re-export of programs with keyword inputs is not supported yet")
        dynamic_shapes: tuple[Any, ...] = tuple(dynamic_args)
    else:
        dynamic_shapes = tuple(leaves)
    try:
        return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        # A view that held only for the layout the upload was traced with: once more with
        # reshapes (the same ops otherwise, so the common case keeps the upload's graph).
        if not views_as_reshapes(gm):
            raise PruningError(f"the pruned program did not export again: {exc}") from exc
    try:
        return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise PruningError(f"the pruned program did not export again: {exc}") from exc


def _aliases(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that is a view of it (through chains of views)."""
    found, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            schema = getattr(user.target, "_schema", None)
            returns = schema.returns if schema is not None else ()
            if user not in found and returns and returns[0].alias_info is not None:
                found.add(user)
                todo.append(user)
    return found


def _mutated(nodes: set[fx.Node]) -> bool:
    """Whether an in-place op writes to any of ``nodes``."""
    for node in nodes:
        for user in node.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and any(
                a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
            ):
                return True
    return False


def views_as_reshapes(gm: fx.GraphModule) -> bool:
    """``view`` -> ``reshape`` where nothing writes through either tensor.

    Export drops a ``.contiguous()`` that was a no-op when it traced (SDPA's output laid out as
    ``(B, N, H, D)`` already: Data2VecVision's ``permute(...).contiguous().view(...)``); traced
    again, the same op can return another layout and the bare ``view`` fails. ``reshape`` is the
    same values whatever the layout, and only aliasing, which nothing here observes, differs.
    Returns whether any view changed.
    """
    view = torch.ops.aten.view.default
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not view:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or _mutated(_aliases(source) | _aliases(node)):
            continue
        node.target = torch.ops.aten.reshape.default
        changed = True
    if changed:
        gm.recompile()
    return changed


def _example_inputs(
    program: torch.export.ExportedProgram, placeholders: list[fx.Node]
) -> tuple[tuple[object, ...], dict[str, object]]:
    example = program.example_inputs
    if example is not None:
        args, kwargs = example
        return tuple(args), dict(kwargs)
    tensors: list[object] = []
    for node in placeholders:
        val = node.meta["val"]
        shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        if val.dtype.is_floating_point:
            tensors.append(torch.randn(shape, dtype=val.dtype))
        else:
            tensors.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(tensors), {}
