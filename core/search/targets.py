"""The targets a job may give instead of a sparsity, by registration: which granularities and
formats each works at, and how it turns sensitivity curves into per-unit ratios.

Example::

    from core.search.targets import choose
    choice = choose(spec.pruning.target, curves, cost_model, baseline)
    pruned_spec = with_ratios(spec.pruning, choice.ratios)
"""

from __future__ import annotations

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
from core.spec import JobSpec, TargetSpec

Chooser = Callable[[float, Sequence[Curve], Sequence[Curve], CostModel], Choice]
Measure = Callable[[Mapping[str, float]], float]
"""The target's own quantity measured on the model pruned at some ratios (a fraction of dense)."""
Refiner = Callable[[float, Callable[[float], Choice], Measure], Choice]


@dataclass(frozen=True)
class TargetKind:
    """One key of ``pruning.target``: where it applies and how ratios are chosen for it.

    ``choose(value, loss_curves, accuracy_curves, cost)`` picks the ratios; ``needs`` names what
    the dense model must be able to do (``macs``: a granularity that removes MACs).
    """

    name: str
    formats: frozenset[str]
    granularities: frozenset[str]
    choose: Chooser
    reduces: str | None = None
    needs_evaluation: bool = False
    # Where the allocation's cost is only a proxy (latency through MACs): re-choose at a tighter
    # proxy budget until the measured quantity meets the target.
    refine: Refiner | None = None


_TARGETS: dict[str, TargetKind] = {}


def register_target(kind: TargetKind) -> TargetKind:
    _TARGETS[kind.name] = kind
    return kind


def targets() -> dict[str, TargetKind]:
    return dict(_TARGETS)


def check_target(fmt: str, spec: JobSpec) -> None:
    """Refuse, before any work, a target this model's format or the spec's granularity cannot
    be searched for, or one judged on evaluation data without an ``evaluation``.

    Raises:
        InvalidSpec: with ``field`` ``pruning`` (or ``evaluation``).
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
            + (
                " (zeroed weights leave the MACs of dense kernels unchanged)"
                if target.kind == "macs"
                else ""
            ),
            "pruning",
        )
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
    measure: Measure,
) -> tuple[Choice, float | None]:
    """As :func:`choose`; for a target whose cost is a proxy, refined against ``measure`` (then
    also returns the measured fraction)."""
    kind = _TARGETS[target.kind]
    if kind.refine is None:
        return choose(target, loss_curves, accuracy_curves, cost), None

    def at(budget: float) -> Choice:
        return kind.choose(budget, loss_curves, accuracy_curves, cost)

    choice = kind.refine(target.value, at, measure)
    return choice, measure(choice.ratios)


def refine_by_measurement(
    value: float, choose_at: Callable[[float], Choice], measure: Measure, tries: int = 6
) -> Choice:
    """Tighten the proxy budget until ``measure`` is within ``value``: a latency fraction falls
    less than the MACs behind it (memory-bound layers, fixed costs). The first step scales the
    budget by the overshoot; the next ones follow the secant through the last two measurements.
    Returns the last choice if ``tries`` do not get there; the job reports it as not met."""
    aim = value * 0.99  # a little under: the artifact is measured again, with its own noise
    budgets = [value]
    choice = choose_at(value)
    measured = [measure(choice.ratios)]
    while measured[-1] > value and len(measured) < tries:
        if len(measured) == 1 or measured[-1] == measured[-2]:
            budget = budgets[-1] * aim / measured[-1]
        else:
            slope = (budgets[-1] - budgets[-2]) / (measured[-1] - measured[-2])
            budget = budgets[-1] + (aim - measured[-1]) * slope
        budget = min(max(budget, 1e-3), budgets[-1])
        try:
            choice = choose_at(budget)
        except InvalidSpec:
            break  # the proxy cannot go lower: keep the closest choice there was
        budgets.append(budget)
        measured.append(measure(choice.ratios))
    return choice


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
        return allocate_to_budget(loss, lambda r: cost.fraction(kind, r), value, sizes=cost.sizes)

    return choose_


def _by_accuracy(
    value: float, _loss: Sequence[Curve], acc: Sequence[Curve], cost: CostModel
) -> Choice:
    # As many MACs (or, where zeros save none, parameters) as the predicted drop allows.
    kind = "macs" if "macs" in cost.reduces else "params"
    return allocate_within_damage(acc, lambda r: cost.fraction(kind, r), value, sizes=cost.sizes)


_CHANNELS = frozenset({"channel", "head"})
register_target(TargetKind("macs", frozenset({"pt2"}), _CHANNELS, _by_cost("macs"), "macs"))
register_target(
    TargetKind(
        "params", frozenset({"pt2"}), _CHANNELS | {"unstructured"}, _by_cost("params"), "params"
    )
)
# Latency is allocated through MACs, then checked on the worker's device and tightened.
register_target(
    TargetKind(
        "latency",
        frozenset({"pt2"}),
        _CHANNELS,
        _by_cost("macs"),
        "macs",
        refine=refine_by_measurement,
    )
)
register_target(
    TargetKind(
        "max_accuracy_drop",
        frozenset({"pt2"}),
        _CHANNELS | {"unstructured"},
        _by_accuracy,
        needs_evaluation=True,
    )
)
# Language models are not scanned yet: the key is public vocabulary, refused with a reason.
register_target(
    TargetKind(
        "max_perplexity_increase", frozenset(), frozenset(), _by_accuracy, needs_evaluation=True
    )
)
