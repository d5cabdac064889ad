"""Rank channel groups, decide how many channels each loses, and produce the smaller program."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from core.allocation import Unit, allocate_units, check_patterns, first_match, removal_count
from core.errors import PruningError
from core.spec import PruningSpec
from core.structure.calibration import Calibration, refit_linear, regression_scores
from core.structure.graph import ChannelGroup, GraphAnalysis, analyze
from core.structure.importance import group_scores
from core.structure.slicing import (
    _get_tensor,
    apply_channels,
    kept_by_space,
    label_indices,
    ordered_members,
    reexport,
    slice_member,
    verify,
)
from core.unstructured import global_counts, lowest_k_mask


@dataclass
class GroupDecision:
    """What happens to one group: how many channels go, or why none do."""

    group: ChannelGroup
    remove: int = 0
    skipped: str | None = None  # excluded, or the criterion cannot rank it
    units: int = 0  # what is counted: channels, or heads with head pruning

    def describe(self) -> dict[str, Any]:
        units = self.units or self.group.size
        return {
            **self.group.describe(),
            "unit": "head" if units != self.group.size else "channel",
            "remove": self.remove,
            "keep": units - self.remove,
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


def plan_channels(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    spec: PruningSpec,
    calibration: Calibration | None = None,
) -> ChannelPlan:
    """How many channels each group loses and which, following ``spec``'s ratios and globs.

    Groups are the units of :func:`core.allocation.allocate_units`, the allocator weight pruning
    uses too: a group is pruned at the sparsity of its first layer (``layer_sparsity`` globs
    apply by layer name); a group with an excluded layer keeps everything. Under ``global``
    scope the pool's channels are ranked together on scores normalised by each group's mean,
    and no group loses more than ``max_layer_sparsity`` of its channels. A group always keeps
    one channel (head).

    Raises:
        InvalidSpec: a glob matches no layer, or the global ratio cannot be met under the caps.
    """
    layers = [name for g in analysis.groups for name in g.layers]
    check_patterns(spec, layers)
    scores = group_scores(gm, analysis, spec, calibration)
    plan = ChannelPlan()
    ranked: dict[str, tuple[GroupDecision, torch.Tensor]] = {}
    for group in analysis.groups:
        decision = GroupDecision(group)
        plan.decisions.append(decision)
        if not group.prunable:
            continue
        if any(first_match(name, spec.exclude) for name in group.layers):
            decision.skipped = "excluded"
            continue
        if group.follows is not None:
            decision.skipped = f"removed with the query heads of group {group.follows}"
            continue
        score = _with_kv(group, scores, analysis)
        if score is None:
            decision.skipped = f"criterion {spec.criterion!r} has nothing to rank these channels by"
            continue
        if spec.granularity == "head":
            if group.unit == 1:
                decision.skipped = "not attention heads"
                continue
            # Rank whole heads: a head's score is the sum over its channels.
            score = score.reshape(-1, group.unit).sum(dim=1)
        decision.units = len(score)
        if group.blocks > 1:
            _plan_grouped(plan, decision, score, spec)
        else:
            ranked[str(group.id)] = (decision, score)
    units = [Unit(key, len(s), tuple(d.group.layers), min_keep=1) for key, (d, s) in ranked.items()]
    item = "heads" if spec.granularity == "head" else "channels"
    allocation = allocate_units(spec, units, item=item, layer_names=layers)
    for key in allocation.per_layer:
        decision, score = ranked[key]
        decision.remove = allocation.removals(key, len(score))
        plan.keep[decision.group.id] = _expand(
            lowest_k_mask(score, decision.remove), decision.group
        )
    if allocation.global_pool:
        pool = {
            key: ranked[key][1] / ranked[key][1].mean().clamp_min(1e-12)
            for key in allocation.global_pool
        }
        counts = global_counts(pool, allocation.global_removals, allocation.global_caps)
        for key, count in counts.items():
            decision = ranked[key][0]
            decision.remove = count
            plan.keep[decision.group.id] = _expand(lowest_k_mask(pool[key], count), decision.group)
    _follow_queries(plan, analysis)
    return plan


def _with_kv(
    group: ChannelGroup, scores: dict[int, torch.Tensor | None], analysis: GraphAnalysis
) -> torch.Tensor | None:
    """A query group's scores plus, per query channel, those of the key/value channels it reads
    (grouped-query attention), so a key/value group is ranked on everything it takes with it."""
    score = scores[group.id]
    if score is None or not group.kv:
        return score
    total = score.clone()
    for kv_id in group.kv:
        kv_score = scores.get(kv_id)
        if kv_score is None:
            continue
        # Spread each key/value head's total over the query channels that read it.
        per_head = kv_score.reshape(-1, analysis.groups_by_id[kv_id].unit).sum(dim=1)
        q_head = group.unit // group.repeat
        total += per_head.repeat_interleave(group.repeat).repeat_interleave(q_head) / q_head
    return total


def _follow_queries(plan: ChannelPlan, analysis: GraphAnalysis) -> None:
    """Key/value heads go where their query heads went: a key/value head is removed with the
    ``repeat`` query heads that read it (they are removed together, a whole group at a time)."""
    for group in analysis.groups:
        keep = plan.keep.get(group.id)
        if keep is None or not group.kv:
            continue
        per_kv = keep.reshape(-1, group.unit)[:, 0]
        for kv_id in group.kv:
            head = analysis.groups_by_id[kv_id].unit
            plan.keep[kv_id] = per_kv.repeat_interleave(head)
            for decision in plan.decisions:
                if decision.group.id == kv_id:  # reported in heads, like its query group
                    decision.units = len(per_kv) if head > 1 else 0
                    decision.remove = int((~per_kv).sum())


def _plan_grouped(
    plan: ChannelPlan, decision: GroupDecision, score: torch.Tensor, spec: PruningSpec
) -> None:
    """Grouped convolutions: the same number of channels from each block, so the count is
    rounded to a multiple of the blocks (and every block keeps one). Ranked at the group's own
    ratio, outside any global pool."""
    group = decision.group
    override = first_match(group.layers[0], list(spec.layer_sparsity))
    ratio = spec.layer_sparsity[override] if override is not None else spec.sparsity
    block = len(score) // group.blocks
    per_block = min(round(removal_count(ratio, len(score)) / group.blocks), block - 1)
    decision.remove = per_block * group.blocks
    rows = score.reshape(group.blocks, block)
    keep = torch.stack([lowest_k_mask(row, per_block) for row in rows]).reshape(-1)
    plan.keep[group.id] = _expand(keep, group)


def _expand(keep: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    """A keep-mask over heads as one over their channels (channel masks pass unchanged)."""
    if keep.numel() == group.size:
        return keep
    return keep.repeat_interleave(group.unit)


def prune_program(
    program: torch.export.ExportedProgram,
    spec: PruningSpec,
    *,
    dry_run: bool = False,
    calibration: Calibration | None = None,
) -> StructuredResult:
    """Remove channels from ``program`` as ``spec`` says and export the smaller program.

    With ``dry_run`` the plan is made and reported but ``program`` is returned unchanged.
    ``calibration`` (one tensor per program input, samples first) feeds the data-aware criteria;
    with ``regression`` the linear layers that lose inputs are refitted by least squares.

    Example:
        >>> pruned = prune_program(torch.export.load("cnn.pt2"),
        ...                        PruningSpec(criterion="l1", granularity="channel", sparsity=0.5))
        >>> torch.export.save(pruned.program, "cnn-small.pt2")

    Raises:
        InvalidSpec: the spec does not fit the model's layers.
        PruningError: the smaller program did not export again.
    """
    gm = program.module()
    try:
        analysis = analyze(gm, heads=spec.granularity == "head")
    except Exception as exc:  # a graph the pass trips over: a clean job error, not a crash
        raise PruningError(f"the channel analysis failed on this program: {exc}") from exc
    plan = plan_channels(gm, analysis, spec, calibration)
    kept = kept_by_space(analysis, plan.keep)
    sizes = {s.id: s.size for s in analysis.spaces}
    kept_out: dict[str, list[int]] = {}
    kept_in: dict[str, list[int]] = {}
    sliced: dict[str, torch.Tensor] = {}
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    for member in ordered_members(analysis):
        if not any(s in kept for s in member.label.spaces):
            continue
        index = label_indices(member.label, kept, sizes)
        current = sliced.get(member.target)
        if current is None:
            # A lifted constant (an empty key/value cache) is neither parameter nor buffer.
            original = tensors.get(member.target)
            current = (
                original if original is not None else _get_tensor(gm, member.target)
            ).detach()
        sliced[member.target] = slice_member(current, member, index, sizes)
        if member.target.endswith(".weight") and member.role in ("in", "grouped_in", "out"):
            layer = member.target.removesuffix(".weight")
            (kept_out if member.role == "out" else kept_in)[layer] = index.tolist()
    shapes = {name: tuple(t.shape) for name, t in sliced.items()}
    nonzero = {name: int(t.count_nonzero()) for name, t in sliced.items()}
    del sliced
    result = StructuredResult(program, analysis, plan, kept_out, kept_in, shapes, nonzero)
    if dry_run or not kept:
        return result
    refitted = False
    if spec.criterion == "regression" and calibration is not None:
        captured = regression_scores(gm, analysis, calibration)[1]
        refitted = bool(refit_linear(gm, analysis, plan.keep, captured))
    apply_channels(gm, analysis, plan.keep)
    pruned = reexport(gm, program)
    renormalised = any(analysis.groups_by_id[g].normalized for g in kept_groups(analysis, kept))
    exact = not (refitted or renormalised or _stochastic(gm))
    verify(program, pruned, analysis, plan.keep, exact=exact)
    result.program = pruned
    return result


def _stochastic(gm: fx.GraphModule) -> bool:
    """Whether the graph draws random numbers (dropout exported in training mode): two runs then
    differ anyway, so only shapes can be compared."""
    for node in gm.graph.nodes:
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        if "dropout" in name and any(arg is True for arg in node.args[1:]):
            return True
        if name in ("rand", "randn", "rand_like", "randn_like", "bernoulli", "multinomial"):
            return True
    return False


def kept_groups(analysis: GraphAnalysis, kept: dict[int, torch.Tensor]) -> set[int]:
    """Groups that lose channels."""
    return {analysis.root_of[s] for s in kept}


__all__ = ["ChannelPlan", "GroupDecision", "StructuredResult", "analyze", "plan_channels"]
