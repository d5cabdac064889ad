"""One rounds driver for every pruner: one shot, or iterative on the cubic AGP schedule with a hook
(evaluation, a share of the fine-tuning) between rounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.formats.base import ModelInfo
from core.pruning.base import PruneContext, PruneOutcome, Pruner
from core.schedule import agp_fractions, rounds_of
from core.spec import PruningSpec

RoundHook = Callable[[int, int, Any], Any]
"""Called after every round but the last: ``(round, rounds, model)``. The fine-tuning stage
trains ``model`` here (in place, or returning a replacement); weights the pruner zeroed are
zeroed again afterwards, so a hook need not keep masks itself."""

RoundProgress = Callable[[int, int, float], None]
"""Told ``(round, rounds, sparsity reached)`` after every round but the last."""


def run_rounds(
    pruner: Pruner,
    model: Any,
    info: ModelInfo,
    spec: PruningSpec,
    ctx: PruneContext,
    *,
    on_round: RoundHook | None = None,
    on_progress: RoundProgress | None = None,
) -> PruneOutcome:
    """Prune ``model`` to ``spec`` in the rounds its schedule asks for (one in a dry run).

    Round t reaches the share ``1 - (1 - t/n)^3`` of the final ratios; the last round reaches
    them exactly. Kept channel indices are composed across rounds, so the outcome names
    channels of the uploaded model.
    """
    rounds = 1 if ctx.dry_run else rounds_of(spec)
    fractions = agp_fractions(rounds)
    outcome: PruneOutcome | None = None
    before = 0.0
    for t, after in enumerate(fractions, start=1):
        step = pruner.round_spec(spec, before, after) if rounds > 1 else spec
        current = pruner.prune(model, info, step, ctx)
        outcome = current if outcome is None else _compose(outcome, current)
        model = current.model
        if t < rounds:
            if on_progress is not None:
                on_progress(t, rounds, spec.sparsity * after)
            if on_round is not None:
                restore = pruner.hold_zeros(model, info)
                model = on_round(t, rounds, model) or model
                restore(model)
                outcome.model = model
        before = after
    assert outcome is not None  # at least one round
    return outcome


def _compose(earlier: PruneOutcome, later: PruneOutcome) -> PruneOutcome:
    """``later``, with its kept indices mapped through ``earlier``'s to the original model."""
    for composed, now in ((earlier.kept_out, later.kept_out), (earlier.kept_in, later.kept_in)):
        for layer, kept in now.items():
            previous = composed.get(layer)
            composed[layer] = [previous[i] for i in kept] if previous is not None else kept
    later.kept_out, later.kept_in = earlier.kept_out, earlier.kept_in
    return later
