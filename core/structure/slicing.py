"""Physically remove channels: slice parameters/buffers, rewrite size constants, re-export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from core.errors import PruningError
from core.structure.graph import GraphAnalysis, Label


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
    if label.inner == 1:
        return channels
    return (channels[:, None] * label.inner + torch.arange(label.inner)[None, :]).reshape(-1)


def kept_by_space(
    analysis: GraphAnalysis, keep: Mapping[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Kept channel indices of every space whose group loses channels (``keep``: group -> mask)."""
    out: dict[int, torch.Tensor] = {}
    for space in analysis.spaces:
        mask = keep.get(analysis.root_of[space.id])
        if mask is not None and not bool(mask.all()):
            out[space.id] = torch.nonzero(mask).flatten()
    return out


def _set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        old = owner._parameters[name]
        requires_grad = bool(old.requires_grad) if old is not None else False
        owner._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


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
    members = {(m.target, m.dim): m for g in analysis.groups for m in g.members}
    with torch.no_grad():
        for (target, dim), member in members.items():
            if not any(s in kept for s in member.label.spaces):
                continue
            tensor = _get_tensor(gm, target)
            index = label_indices(member.label, kept, sizes)
            _set_tensor(gm, target, tensor.index_select(dim, index).clone())
    by_name = {n.name: n for n in gm.graph.nodes}
    rewrites = {(r.node, r.arg, r.index): r for g in analysis.groups for r in g.rewrites}
    for (node_name, arg, position), rewrite in rewrites.items():
        if not any(s in kept for s in rewrite.label.spaces):
            continue
        node = by_name[node_name]
        value = len(label_indices(rewrite.label, kept, sizes))
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
    members = {(m.target, m.dim): m for g in analysis.groups for m in g.members if m.role == "in"}
    with torch.no_grad():
        for (target, dim), member in members.items():
            if not any(s in kept for s in member.label.spaces):
                continue
            tensor = _get_tensor(gm, target)
            index = label_indices(member.label, kept, sizes)
            mask = torch.zeros(tensor.shape[dim], dtype=torch.bool)
            mask[index] = True
            shape = [1] * tensor.dim()
            shape[dim] = -1
            tensor.mul_(mask.reshape(shape).to(tensor.dtype))


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
        raise PruningError(f"the pruned program did not export again: {exc}") from exc


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
