"""Channel importance: a score per channel of every dependency group, higher keeps; one registered
scorer per criterion.

Adding a criterion that ranks channels: a function decorated with ``@group_score("name")`` and
its entry in :mod:`core.criteria`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import fx

from core.errors import InvalidSpec
from core.spec import PruningSpec
from core.structure.calibration import (
    Calibration,
    apoz_scores,
    regression_scores,
    taylor_scores,
)
from core.structure.graph import GraphAnalysis, Member

GroupScores = dict[int, torch.Tensor | None]
GroupScore = Callable[[fx.GraphModule, GraphAnalysis, PruningSpec, Calibration | None], GroupScores]
_SCORERS: dict[str, GroupScore] = {}


def group_score(*names: str) -> Callable[[GroupScore], GroupScore]:
    """Register a scorer ``(graph, analysis, spec, calibration) -> {group id: scores | None}``
    for ``names``; ``None`` for a group means the criterion cannot rank it."""

    def register(fn: GroupScore) -> GroupScore:
        for name in names:
            _SCORERS[name] = fn
        return fn

    return register


def group_scorers() -> dict[str, GroupScore]:
    """Every registered channel scorer by criterion."""
    return dict(_SCORERS)


def group_scores(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    spec: PruningSpec,
    calibration: Calibration | None = None,
) -> GroupScores:
    """Importance of every channel of every group (float32, higher keeps); None: cannot rank."""
    return _SCORERS[spec.criterion](gm, analysis, spec, calibration)


def _segments(member: Member, analysis: GraphAnalysis) -> list[tuple[int, int, int]]:
    """(group id, start, length) of each space along the member's dim, in channel units."""
    out = []
    offset = 0
    for space in member.label.spaces:
        size = analysis.spaces[space].size
        out.append((analysis.root_of[space], offset, size))
        offset += size
    return out


def _summed_powers(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    roles: tuple[str, ...],
    p: float,
    mean: bool = False,
) -> GroupScores:
    """Per channel, the sum of ``|w|^p`` over the members in ``roles`` that carry it; with
    ``mean``, divided by the number of tensors that contributed."""
    parameters = dict(gm.named_parameters())
    scores: GroupScores = {}
    for group in analysis.groups:
        total = torch.zeros(group.size, dtype=torch.float32)
        found = False
        tensors = 0
        for member in group.members:
            if member.role not in roles:
                continue
            tensor = parameters.get(member.target)
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
                tensors += 1
        scores[group.id] = (total / max(tensors, 1) if mean else total) if found else None
    return scores


@group_score("l1", "l2", "lp")
def _magnitude(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    """``|w|^p`` summed over the weights that *produce* the channel in every coupled layer (the
    filters of all convolutions/linears writing to it, as in L1-filter pruning), so a zeroed
    filter ranks last."""
    p = {"l1": 1.0, "l2": 2.0}.get(spec.criterion, spec.p or 1.0)
    return _summed_powers(gm, analysis, ("out",), p)


@group_score("group_l1", "group_l2")
def _group_magnitude(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    """Torch-Pruning's group magnitude (``GroupMagnitudeImportance``, mean reduction): ``|w|^p``
    over *every* coupled tensor of the channel -- the filters that produce it, the input
    columns of every layer that consumes it and the BatchNorm/LayerNorm scale that follows it --
    averaged over those tensors. A channel whose filter is small but whose consumers lean on it
    is kept. (Under ``global`` scope each group is divided by its mean before ranking, as
    Torch-Pruning's ``normalizer="mean"``; see :func:`core.structure.prune.plan_channels`.)"""
    p = 2.0 if spec.criterion == "group_l2" else 1.0
    return _summed_powers(gm, analysis, ("out", "in", "norm"), p, mean=True)


@group_score("bn_scale")
def _bn_scale(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    """``|gamma|`` of the BatchNorm/LayerNorm scales that follow the channels (network
    slimming)."""
    return _summed_powers(gm, analysis, ("norm",), 1.0)


@group_score("random")
def _random(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    """Seeded by the spec and the group's layers: the same on every run and machine."""
    scores: GroupScores = {}
    for group in analysis.groups:
        seed = spec.seed * 1_000_003 + zlib.crc32(",".join(group.layers).encode())
        scores[group.id] = torch.rand(group.size, generator=torch.Generator().manual_seed(seed))
    return scores


def _needs(calibration: Calibration | None, spec: PruningSpec) -> Calibration:
    if calibration is None:
        raise InvalidSpec(f"criterion {spec.criterion!r} needs calibration data")
    return calibration


@group_score("apoz")
def _apoz(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    return dict(apoz_scores(gm, analysis, _needs(calibration, spec)))


@group_score("regression")
def _regression(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    return dict(regression_scores(gm, analysis, _needs(calibration, spec))[0])


@group_score("taylor")
def _taylor(
    gm: fx.GraphModule, analysis: GraphAnalysis, spec: PruningSpec, calibration: Calibration | None
) -> GroupScores:
    return dict(taylor_scores(gm, analysis, _needs(calibration, spec)))
