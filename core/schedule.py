"""Pruning schedules: one shot, or iterative on the cubic AGP curve (Zhu & Gupta, 2017).

Example::

    from core.schedule import agp_fractions, at_fraction

    for f in agp_fractions(4):            # 0.578, 0.875, 0.984, 1.0
        step = at_fraction(spec, f)       # the same spec at f x its ratios
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.spec import PruningSpec

RoundHook = Callable[[int, int, torch.export.ExportedProgram], torch.export.ExportedProgram | None]
"""Called after every round but the last: ``(round, rounds, program)``. The fine-tuning stage
trains ``program`` here (in place, or returning a replacement); pruned weights are zeroed again
afterwards, so a hook need not keep masks itself."""


def agp_fractions(rounds: int) -> list[float]:
    """Share of the final sparsity reached after each round: ``1 - (1 - t/n)^3``, t = 1..n.

    The cubic prunes fast while many redundant weights remain and slowly near the end.
    """
    return [1.0 - (1.0 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def rounds_of(spec: PruningSpec) -> int:
    return spec.schedule.rounds if spec.schedule.kind == "iterative" else 1


def shares_budget(spec: PruningSpec) -> bool:
    """Whether the rounds spend the fine-tune's own steps (``fine_tune_budget: shared``)."""
    return spec.schedule.kind == "iterative" and spec.schedule.fine_tune_budget == "shared"


def round_steps(rounds: int, total: int, *, shared: bool) -> tuple[int, int]:
    """Optimizer steps of the fine-tune after each round but the last, and after the last, for
    a fine-tune of ``total`` steps.

    Added budget (and one shot): ``total / rounds`` between rounds, then all ``total``. Shared:
    half of ``total`` spread over the rounds while the sparsity climbs, the rest (at least
    half) at the final sparsity, so the job trains ``total`` steps in all.
    """
    if rounds <= 1:
        return 0, total
    if shared:
        between = max(1, total // (2 * (rounds - 1)))
        return between, max(1, total - between * (rounds - 1))
    return max(1, total // rounds), total


def at_fraction(spec: PruningSpec, fraction: float) -> PruningSpec:
    """``spec`` with its sparsity and every per-layer override scaled by ``fraction``."""
    if fraction >= 1.0:
        return spec
    overrides = {glob: ratio * fraction for glob, ratio in spec.layer_sparsity.items()}
    return spec.model_copy(
        update={"sparsity": spec.sparsity * fraction, "layer_sparsity": overrides}
    )


def relative_step(spec: PruningSpec, before: float, after: float) -> PruningSpec:
    """The step from ``before`` to ``after`` (shares of the final ratios) of a program that has
    already lost its ``before`` share: structured rounds shrink the program, so each round's
    ratio is of what is left, ``1 - (1 - s_after) / (1 - s_before)``."""

    def step(ratio: float) -> float:
        return 1.0 - (1.0 - ratio * after) / (1.0 - ratio * before)

    overrides = {glob: step(ratio) for glob, ratio in spec.layer_sparsity.items()}
    return spec.model_copy(update={"sparsity": step(spec.sparsity), "layer_sparsity": overrides})
