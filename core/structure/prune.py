"""Rank channel groups, decide how many channels each loses, and produce the smaller program."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from core.allocation import _check_patterns_match, _first_match, removal_count
from core.errors import InvalidSpec
from core.spec import PruningSpec
from core.structure.graph import ChannelGroup, GraphAnalysis, Member, analyze
from core.structure.slicing import apply_channels, kept_by_space, label_indices, reexport
from core.unstructured import _global_counts, lowest_k_mask


@dataclass
class GroupDecision:
    """What happens to one group: how many channels go, or why none do."""

    group: ChannelGroup
    remove: int = 0
    skipped: str | None = None  # excluded, or the criterion cannot rank it

    def describe(self) -> dict[str, Any]:
        return {
            **self.group.describe(),
            "remove": self.remove,
            "keep": self.group.size - self.remove,
            "skipped": self.skipped,
        }


@dataclass
class ChannelPlan:
    """Keep-masks per group id, and the per-group decisions for the report."""

    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    decisions: list[GroupDecision] = field(default_factory=list)


@dataclass
class StructuredResult:
    """The smaller program and what was removed from it."""

    program: torch.export.ExportedProgram
    analysis: GraphAnalysis
    plan: ChannelPlan
    kept_out: dict[str, list[int]]  # layer -> kept output channels (layers that lost some)
    kept_in: dict[str, list[int]]  # layer -> kept input columns of its weight
    shapes: dict[str, tuple[int, ...]]  # parameter/buffer -> its shape after slicing (sliced ones)
    nonzero: dict[str, int]  # sliced parameter/buffer -> its nonzero entries after slicing

    def report(self) -> list[dict[str, Any]]:
        return [d.describe() for d in self.plan.decisions]


def _segments(member: Member, analysis: GraphAnalysis) -> list[tuple[int, int, int]]:
    """(group id, start, length) of each space along the member's dim, in channel units."""
    out = []
    offset = 0
    for space in member.label.spaces:
        size = analysis.spaces[space].size
        out.append((analysis.root_of[space], offset, size))
        offset += size
    return out


def group_scores(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec
) -> dict[int, torch.Tensor | None]:
    """Importance of every channel of every group (float32, higher keeps); None: cannot rank.

    Magnitude criteria sum ``|w|^p`` over the weights that *produce* the channel in every coupled
    layer (the filters of all convolutions/linears writing to it, as in L1-filter pruning), so a
    zeroed filter ranks last. ``bn_scale`` sums ``|gamma|`` of the BatchNorm/LayerNorm scales that
    follow the channels (network slimming). ``random`` is seeded by the spec and the group.
    """
    scores: dict[int, torch.Tensor | None] = {}
    for group in analysis.groups:
        if spec.criterion == "random":
            seed = spec.seed * 1_000_003 + zlib.crc32(",".join(group.layers).encode())
            generator = torch.Generator().manual_seed(seed)
            scores[group.id] = torch.rand(group.size, generator=generator)
            continue
        roles = ("norm",) if spec.criterion == "bn_scale" else ("out",)
        p = {"l1": 1.0, "l2": 2.0, "bn_scale": 1.0}.get(spec.criterion, spec.p or 1.0)
        total = torch.zeros(group.size, dtype=torch.float32)
        found = False
        for member in group.members:
            if member.role not in roles:
                continue
            tensor = dict(gm.named_parameters()).get(member.target)
            if tensor is None:
                continue
            w = tensor.detach().to(torch.float32).movedim(member.dim, 0)
            inner = member.label.inner
            for gid, start, length in _segments(member, analysis):
                if gid != group.id:
                    continue
                part = w[start * inner : (start + length) * inner].reshape(length, -1)
                total += part.abs().pow(p).sum(dim=1)
                found = True
        scores[group.id] = total if found else None
    return scores


def plan_channels(gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec) -> ChannelPlan:
    """How many channels each group loses and which, following ``spec``'s ratios and globs.

    A group is pruned at the sparsity of its first layer (``layer_sparsity`` globs apply by
    layer name); a group with an excluded layer keeps everything. Under ``global`` scope the
    pool's channels are ranked together on scores normalised by each group's mean, and no group
    loses more than ``max_layer_sparsity`` of its channels. A group always keeps one channel.

    Raises:
        InvalidSpec: a glob matches no layer, or the global ratio cannot be met under the caps.
    """
    layers = [name for g in analysis.groups for name in g.layers]
    _check_patterns_match("exclude", spec.exclude, layers)
    _check_patterns_match("layer_sparsity", list(spec.layer_sparsity), layers)
    scores = group_scores(gm, analysis, spec)
    plan = ChannelPlan()
    pool: dict[str, torch.Tensor] = {}  # str keys: the water-filling is shared with layers
    for group in analysis.groups:
        decision = GroupDecision(group)
        plan.decisions.append(decision)
        if not group.prunable:
            continue
        if any(_first_match(name, spec.exclude) for name in group.layers):
            decision.skipped = "excluded"
            continue
        score = scores[group.id]
        if score is None:
            decision.skipped = f"criterion {spec.criterion!r} has nothing to rank these channels by"
            continue
        override = _first_match(group.layers[0], list(spec.layer_sparsity))
        if override is not None:
            decision.remove = min(
                removal_count(spec.layer_sparsity[override], group.size), group.size - 1
            )
        elif spec.scope == "global":
            pool[str(group.id)] = score / score.mean().clamp_min(1e-12)
            continue
        else:
            decision.remove = min(removal_count(spec.sparsity, group.size), group.size - 1)
        plan.keep[group.id] = lowest_k_mask(score, decision.remove)
    if pool:
        sizes = {gid: int(s.numel()) for gid, s in pool.items()}
        total = removal_count(spec.sparsity, sum(sizes.values()))
        caps = {g: min(int(spec.max_layer_sparsity * n), n - 1) for g, n in sizes.items()}
        if sum(caps.values()) < total:
            raise InvalidSpec(
                f"global sparsity {spec.sparsity} removes {total} of {sum(sizes.values())} "
                f"channels but the groups can give up only {sum(caps.values())} (each keeps at "
                "least one channel and at most max_layer_sparsity goes); lower sparsity"
            )
        counts = _global_counts(pool, total, caps)
        for decision in plan.decisions:
            key = str(decision.group.id)
            if key in counts:
                decision.remove = counts[key]
                plan.keep[decision.group.id] = lowest_k_mask(pool[key], decision.remove)
    return plan


def prune_program(
    program: torch.export.ExportedProgram, spec: PruningSpec, *, dry_run: bool = False
) -> StructuredResult:
    """Remove channels from ``program`` as ``spec`` says and export the smaller program.

    With ``dry_run`` the plan is made and reported but ``program`` is returned unchanged.

    Example:
        >>> pruned = prune_program(torch.export.load("cnn.pt2"),
        ...                        PruningSpec(criterion="l1", granularity="channel", sparsity=0.5))
        >>> torch.export.save(pruned.program, "cnn-small.pt2")

    Raises:
        InvalidSpec: the spec does not fit the model's layers.
        PruningError: the smaller program did not export again.
    """
    gm = program.module()
    analysis = analyze(gm)
    plan = plan_channels(gm, analysis, spec)
    kept = kept_by_space(analysis, plan.keep)
    sizes = {s.id: s.size for s in analysis.spaces}
    kept_out = {analysis.spaces[s].producer: idx.tolist() for s, idx in kept.items()}
    kept_in: dict[str, list[int]] = {}
    sliced: dict[str, torch.Tensor] = {}
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    for group in analysis.groups:
        for member in group.members:
            if not any(s in kept for s in member.label.spaces):
                continue
            index = label_indices(member.label, kept, sizes)
            current = sliced.get(member.target, tensors[member.target].detach())
            if current.shape[member.dim] == tensors[member.target].shape[member.dim]:
                sliced[member.target] = current.index_select(member.dim, index)
            if member.role == "in" and member.target.endswith(".weight"):
                kept_in[member.target.removesuffix(".weight")] = index.tolist()
    shapes = {name: tuple(t.shape) for name, t in sliced.items()}
    nonzero = {name: int(t.count_nonzero()) for name, t in sliced.items()}
    del sliced
    result = StructuredResult(program, analysis, plan, kept_out, kept_in, shapes, nonzero)
    if dry_run or not kept:
        return result
    apply_channels(gm, analysis, plan.keep)
    result.program = reexport(gm, program)
    return result


__all__ = ["ChannelPlan", "GroupDecision", "StructuredResult", "analyze", "plan_channels"]
