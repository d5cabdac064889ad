"""The targets a job may give instead of a sparsity, by registration: which granularities and
formats each works at, and how it turns sensitivity curves into per-unit ratios.

Example::

    from core.search.targets import choose
    choice = choose(spec.pruning.target, curves, cost_model, baseline)
    pruned_spec = with_ratios(spec.pruning, choice.ratios)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidSpec
from core.search.allocate import (
    Choice,
    Curve,
    allocate_to_budget,
    allocate_within_damage,
)
from core.search.cost import CostModel
from core.search.units import family_for
from core.spec import JobSpec, TargetSpec

Chooser = Callable[[float, Sequence[Curve], Sequence[Curve], CostModel], Choice]
Measure = Callable[[Mapping[str, float]], float]
"""The target's own quantity measured on the model pruned at some ratios (a fraction of dense)."""
Refiner = Callable[[float, Callable[[float], Choice], Measure], Choice]
Measurer = Callable[[Any, Mapping[str, float], Any], float]
"""``(scanner, ratios, measure_config)`` -> the target's quantity measured with those ratios."""
Judge = Callable[[Mapping[str, float], Mapping[str, float]], float | None]
"""A quality target's quantity from the evaluation scores before and after (None: unscored)."""


@dataclass(frozen=True)
class TargetKind:
    """One key of ``pruning.target``: where it applies and how ratios are chosen for it.

    ``choose(value, loss_curves, accuracy_curves, cost)`` picks the ratios; ``reduces`` names
    the cost it budgets; ``why_not`` says why the granularities left out cannot reach it.
    """

    name: str
    formats: frozenset[str]
    granularities: frozenset[str]
    choose: Chooser
    reduces: str | None = None
    why_not: str | None = None
    needs_evaluation: bool = False
    # Where the allocation's cost is only a proxy (latency through MACs): re-choose at a tighter
    # proxy budget until the measured quantity meets the target.
    refine: Refiner | None = None
    measure: Measurer | None = None
    # A quality target: how the verified result is judged, which curves its damage budget is in
    # ("accuracy" or "loss") and that budget for a target value (a step back halves it).
    judge: Judge | None = None
    curves: str = "accuracy"
    damage_budget: Callable[[float], float] = float


_TARGETS: dict[str, TargetKind] = {}


def register_target(kind: TargetKind) -> TargetKind:
    _TARGETS[kind.name] = kind
    return kind


def targets() -> dict[str, TargetKind]:
    return dict(_TARGETS)


def check_target(fmt: str, spec: JobSpec) -> None:
    """Refuse, before any work, a target this model's format or the spec's granularity cannot
    be searched for, a search grid the granularity's scan cannot use, or a target judged on
    evaluation data without an ``evaluation``.

    Raises:
        InvalidSpec: with ``field`` ``pruning`` (or ``evaluation``, ``pruning.search.grid``).
    """
    target = spec.pruning.target
    if target is None:
        return
    kind = _TARGETS[target.kind]
    granularity = spec.pruning.granularity
    if fmt not in kind.formats:
        raise InvalidSpec(
            f"target {target.kind!r} is not available for {fmt!r} models; it applies to "
            f"{', '.join(sorted(kind.formats)) or 'no format yet'}",
            "pruning",
        )
    if granularity not in kind.granularities:
        raise InvalidSpec(
            f"target {target.kind!r} cannot be reached at granularity {granularity!r}; it can "
            f"at {', '.join(sorted(kind.granularities))}"
            + (f" ({kind.why_not})" if kind.why_not else ""),
            "pruning",
        )
    # A scan for this pair exists (depth on hf, say, not yet), can use the grid asked for and
    # has something left to search.
    family_for(fmt, granularity).check(spec.pruning)
    if kind.needs_evaluation and spec.evaluation is None:
        raise InvalidSpec(
            f"target {target.kind!r} is judged on the evaluation data; add 'evaluation'",
            "evaluation",
        )


def choose(
    target: TargetSpec,
    loss_curves: Sequence[Curve],
    accuracy_curves: Sequence[Curve],
    cost: CostModel,
) -> Choice:
    """Per-unit ratios for ``target`` from the scan's curves and the model's cost."""
    return _TARGETS[target.kind].choose(target.value, loss_curves, accuracy_curves, cost)


def choose_measured(
    target: TargetSpec,
    loss_curves: Sequence[Curve],
    accuracy_curves: Sequence[Curve],
    cost: CostModel,
    scanner: Any,
    config: Any = None,
) -> tuple[Choice, float | None]:
    """As :func:`choose`; for a target the curves only predict (latency through MACs, perplexity
    through per-layer damage), refined against the quantity measured through ``scanner`` (with
    ``config``, a ``MeasureConfig``), then also returns that measurement."""
    kind = _TARGETS[target.kind]
    if kind.refine is None or kind.measure is None:
        return choose(target, loss_curves, accuracy_curves, cost), None
    how = kind.measure
    seen: dict[tuple[tuple[str, float], ...], float] = {}

    def measure(ratios: Mapping[str, float]) -> float:
        key = tuple(sorted(ratios.items()))
        if key not in seen:  # the last try is asked for again: measure it once
            seen[key] = how(scanner, ratios, config)
        return seen[key]

    def at(budget: float) -> Choice:
        return kind.choose(budget, loss_curves, accuracy_curves, cost)

    choice = kind.refine(target.value, at, measure)
    return choice, measure(choice.ratios)


def judge(
    target: TargetSpec, before: Mapping[str, float] | None, after: Mapping[str, float] | None
) -> float | None:
    """The target's quantity measured from the evaluation scores (``max_accuracy_drop``: the
    accuracy lost; ``max_perplexity_increase``: the relative rise), None where it is not a
    quality target or was not scored."""
    kind = _TARGETS[target.kind]
    if kind.judge is None or not before or not after:
        return None
    return kind.judge(before, after)


def refine_by_measurement(
    value: float, choose_at: Callable[[float], Choice], measure: Measure, tries: int = 6
) -> Choice:
    """Tighten the proxy budget until ``measure`` is within ``value``: a latency fraction falls
    less than the MACs behind it (memory-bound layers, fixed costs). The first step scales the
    budget by the overshoot; the next ones follow the secant through the last two measurements,
    or scale again where the secant does not fall (a timing that rose as the budget fell is
    noise: the secant would ask for the same budget again) or falls below what the proxy can
    reach. Returns the first choice within
    ``value``; if ``tries`` do not get there, the one measured lowest (the job reports the
    target as not met)."""
    aim = value * 0.99  # a little under: the artifact is measured again, with its own noise
    budgets = [value]
    choices = [choose_at(value)]
    measured = [measure(choices[0].ratios)]
    while measured[-1] > value and len(measured) < tries:
        steps = [budgets[-1] * aim / measured[-1]]
        if len(measured) > 1 and measured[-1] < measured[-2]:
            slope = (budgets[-1] - budgets[-2]) / (measured[-1] - measured[-2])
            # The secant first. Where the last timing fell by no more than noise, it points
            # past anything the proxy can reach: the scaled step is still tried then.
            steps.insert(0, budgets[-1] + (aim - measured[-1]) * slope)
        reached = _first_reachable(steps, budgets[-1], choose_at)
        if reached is None:
            break  # the proxy cannot go lower: keep the closest choice there was
        budget, choice = reached
        budgets.append(budget)
        choices.append(choice)
        measured.append(measure(choice.ratios))
    if measured[-1] <= value:
        return choices[-1]
    return choices[min(range(len(measured)), key=measured.__getitem__)]


def _first_reachable(
    steps: Sequence[float], last: float, choose_at: Callable[[float], Choice]
) -> tuple[float, Choice] | None:
    """The first of ``steps`` (each held within ``(0, last]``) the proxy can choose at, and its
    choice; None where it can reach none."""
    for step in steps:
        budget = min(max(step, 1e-3), last)
        try:
            return budget, choose_at(budget)
        except InvalidSpec:
            continue
    return None


def curves_from_cells(
    units: Sequence[str],
    baseline: Mapping[str, float],
    cells: Mapping[tuple[str, float], Mapping[str, float]],
    metric: str,
    *,
    higher_is_better: bool,
) -> list[Curve]:
    """One damage curve per unit from scanned cells ``(unit, ratio) -> scores``."""
    sign = -1.0 if higher_is_better else 1.0
    out = []
    for unit in units:
        scores = {r: sign * s[metric] for (u, r), s in cells.items() if u == unit and metric in s}
        out.append(Curve.from_scores(unit, sign * baseline[metric], scores))
    return out


def sensitivity_document(
    units: Sequence[Any],
    baseline: Mapping[str, float],
    cells: Mapping[tuple[str, float], Mapping[str, float]],
) -> dict[str, Any]:
    """The ``sensitivity`` artifact: per unit, its layers, size and the scores at each ratio."""
    return {
        "baseline": dict(baseline),
        "units": [
            {
                "unit": u.key,
                "layers": list(u.layers),
                "size": u.size,
                "curve": [
                    {"ratio": r, **cells[(key, r)]} for (key, r) in sorted(cells) if key == u.key
                ],
            }
            for u in units
        ],
    }


def _by_cost(kind: str) -> Chooser:
    def choose_(
        value: float, loss: Sequence[Curve], _acc: Sequence[Curve], cost: CostModel
    ) -> Choice:
        return allocate_to_budget(loss, lambda r: cost.fraction(kind, r), value, **_steps(cost))

    return choose_


def _steps(cost: CostModel) -> dict[str, Any]:
    """How the allocation may step each unit, as the cost model says: whole items (``sizes``),
    only to ratios the pruner can build (``allowed``), only to fixed ``levels`` (n:m)."""
    return {"sizes": cost.sizes, "allowed": cost.allows, "levels": cost.levels}


def within_damage(curves: Sequence[Curve], cost: CostModel, budget: float) -> Choice:
    """As many MACs (or, where zeros save none, parameters) removed as ``budget`` of predicted
    damage on ``curves`` allows."""
    kind = "macs" if "macs" in cost.reduces else "params"
    return allocate_within_damage(curves, lambda r: cost.fraction(kind, r), budget, **_steps(cost))


def _by_accuracy(
    value: float, _loss: Sequence[Curve], acc: Sequence[Curve], cost: CostModel
) -> Choice:
    return within_damage(acc, cost, value)


def _perplexity_budget(value: float) -> float:
    # The curves are in loss (log perplexity): a relative rise v is a loss rise of log(1 + v).
    return math.log1p(value)


def _by_perplexity(
    value: float, loss: Sequence[Curve], _acc: Sequence[Curve], cost: CostModel
) -> Choice:
    return within_damage(loss, cost, _perplexity_budget(value))


def _accuracy_drop(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    if "accuracy" not in before or "accuracy" not in after:
        return None
    return float(before["accuracy"] - after["accuracy"])


def _perplexity_rise(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    if "perplexity" not in before or "perplexity" not in after:
        return None
    return float(after["perplexity"] / before["perplexity"] - 1.0)


_CHANNELS = frozenset({"channel", "head"})
# Granularities that remove whole structures, so MACs fall: channels and heads of programs, the
# width (MLP neurons, heads, hidden channels) of language models.
_STRUCTURED = _CHANNELS | {"width"}
# Weights zeroed in place (n:m too: the worker's kernels are dense) leave MACs as they were.
_ZEROS_KEEP_MACS = (
    "zeroed weights, n:m patterns included, leave the MACs of the dense kernels the worker's "
    "device runs unchanged"
)
register_target(
    TargetKind(
        "macs",
        frozenset({"pt2", "hf"}),
        _STRUCTURED,
        _by_cost("macs"),
        "macs",
        why_not=_ZEROS_KEEP_MACS,
    )
)
# With n:m a unit is dense or n:m; the allocation picks which are n:m (see core.search.nm). At
# block a layer loses whole blocks, one at a time (see core.search.blocks).
register_target(
    TargetKind(
        "params",
        frozenset({"pt2", "hf"}),
        _STRUCTURED | {"unstructured", "n:m", "block"},
        _by_cost("params"),
        "params",
    )
)
# Latency is allocated through MACs, then checked on the worker's device and tightened: on
# ``pt2`` the pruned program, on ``hf`` the width-narrowed copy (each scanner times it the way
# its format's ``latency_ms_*`` metric does).
register_target(
    TargetKind(
        "latency",
        frozenset({"pt2", "hf"}),
        _STRUCTURED,
        _by_cost("macs"),
        "macs",
        why_not=f"latency is reached by removing MACs, and {_ZEROS_KEEP_MACS}",
        refine=refine_by_measurement,
        measure=lambda scanner, ratios, config: scanner.latency_fraction(ratios, config),
    )
)
register_target(
    TargetKind(
        "max_accuracy_drop",
        frozenset({"pt2"}),
        _CHANNELS | {"unstructured", "n:m", "block"},
        _by_accuracy,
        needs_evaluation=True,
        judge=_accuracy_drop,
    )
)
# Language models: allocated over the loss curves of decoder layers (or width kinds), then
# measured on the search text with every chosen ratio at once and tightened (units' damage adds
# up to more than the sum of their curves), then judged by perplexity on the evaluation text.
register_target(
    TargetKind(
        "max_perplexity_increase",
        frozenset({"hf"}),
        frozenset({"unstructured", "width", "n:m"}),
        _by_perplexity,
        needs_evaluation=True,
        refine=refine_by_measurement,
        measure=lambda scanner, ratios, _config: scanner.perplexity_rise(ratios),
        judge=_perplexity_rise,
        curves="loss",
        damage_budget=_perplexity_budget,
    )
)
