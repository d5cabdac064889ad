"""From sensitivity curves to per-unit ratios: the least predicted damage for the saving asked.

Each unit's curve says how much worse the model scores (the search data's loss, above the dense
model's) with that unit alone pruned at each grid ratio; between grid points it is interpolated,
and made non-decreasing (a noisy dip is no reason to prune more). Damage is taken as additive
over units -- the usual first-order assumption of sensitivity analysis -- and the job measures
what it really achieved after.

Greedy on marginal cost: starting from nothing pruned, repeatedly give ``step`` more ratio to the
unit whose next step adds the least damage per unit of cost saved, until the cost is within the
budget. With a cost that falls smoothly as each unit is pruned this is the classic fractional
knapsack heuristic; it is what AMC-style and "layer-wise sensitivity" searches approximate.
Whole items (channels, heads, key/value groups) make it a 0/1 knapsack, so two repairs follow:
steps a large last item made unnecessary are given back, then single exchanges (one step back
for one unit, as few forward for another as keep the budget) are made while the predicted
damage falls.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from core.allocation import removal_count
from core.errors import InvalidSpec


@dataclass(frozen=True)
class Curve:
    """Damage of one unit against its ratio: ``ratios`` increasing from 0, ``damage`` (>= 0,
    non-decreasing) at each."""

    unit: str
    ratios: tuple[float, ...]
    damage: tuple[float, ...]

    @classmethod
    def from_scores(cls, unit: str, baseline: float, scores: Mapping[float, float]) -> Curve:
        """``scores`` (ratio -> loss, higher is worse) against the dense ``baseline`` loss."""
        ratios = [0.0, *sorted(scores)]
        damage = [0.0]
        for r in ratios[1:]:
            damage.append(max(damage[-1], scores[r] - baseline))
        return cls(unit, tuple(ratios), tuple(damage))

    @property
    def max_ratio(self) -> float:
        return self.ratios[-1]

    def at(self, ratio: float) -> float:
        """The damage at ``ratio``, linear between grid points."""
        if ratio >= self.ratios[-1]:
            return self.damage[-1]
        i = bisect.bisect_right(self.ratios, ratio)
        r0, r1 = self.ratios[i - 1], self.ratios[i]
        d0, d1 = self.damage[i - 1], self.damage[i]
        return d0 + (d1 - d0) * (ratio - r0) / (r1 - r0)


@dataclass(frozen=True)
class Choice:
    """Ratios per unit and what they are predicted to cost (fraction of dense) and damage."""

    ratios: dict[str, float]
    cost: float
    damage: float


Cost = Callable[[Mapping[str, float]], float]


def allocate_to_budget(
    curves: Sequence[Curve],
    cost: Cost,
    budget: float,
    *,
    step: float = 0.01,
    sizes: Mapping[str, int] | None = None,
    allowed: Callable[[Mapping[str, float]], bool] | None = None,
    levels: Mapping[str, Sequence[float]] | None = None,
) -> Choice:
    """The ratios, on multiples of ``step``, at which ``cost`` (a fraction of the dense model's)
    is at most ``budget``, greedily at the least predicted damage (never through ratios that
    are not ``allowed``: sizes a model's config refuses, say).

    Example:
        >>> flat = Curve("a", (0.0, 0.5), (0.0, 0.0)); steep = Curve("b", (0.0, 0.5), (0.0, 1.0))
        >>> allocate_to_budget([flat, steep], lambda r: 1 - 0.5 * sum(r.values()), 0.8).ratios
        {'a': 0.4, 'b': 0.0}

    ``sizes`` (unit -> items) makes each step remove whole items, so the prediction is what the
    pruner will do. ``levels`` (unit -> ratios) are the only ratios above 0 a unit may take
    (a fixed pattern such as n:m: dense or 1 - n/m); a step moves it to the next one.

    Raises:
        InvalidSpec: even every unit at its largest grid ratio costs more than ``budget``.
    """
    ratios, current = _greedy(
        curves, cost, step, sizes, lambda r, c: c <= budget + 1e-12, allowed, levels
    )
    if current <= budget + 1e-12:
        ratios, current = _give_back(curves, cost, budget, ratios, step, sizes, allowed, levels)
        ratios, current = _exchange(curves, cost, budget, ratios, step, sizes, allowed, levels)
    if current > budget + 1e-12:
        # Where every unit's ratio is fixed by its pattern, a wider grid cannot help.
        fixed = levels is not None and all(c.unit in levels for c in curves)
        raise InvalidSpec(
            f"the target cannot be reached: with every searched layer at its largest "
            f"{'pattern' if fixed else 'grid'} ratio the model keeps {current:.3f} of the dense "
            f"cost, above {budget}; "
            + ("relax the target" if fixed else "widen the search grid or relax the target"),
            "pruning",
        )
    return Choice(ratios, current, predicted_damage(curves, ratios))


def allocate_within_damage(
    curves: Sequence[Curve],
    cost: Cost,
    max_damage: float,
    *,
    step: float = 0.01,
    sizes: Mapping[str, int] | None = None,
    allowed: Callable[[Mapping[str, float]], bool] | None = None,
    levels: Mapping[str, Sequence[float]] | None = None,
) -> Choice:
    """As much pruning as the greedy order allows while the predicted damage stays within
    ``max_damage`` (for targets judged by quality, not cost), through ``allowed`` ratios and,
    for a unit with ``levels``, only those (as for :func:`allocate_to_budget`)."""
    ratios, current = _greedy(
        curves,
        cost,
        step,
        sizes,
        lambda r, c: False,
        allowed=lambda trial: (
            predicted_damage(curves, trial) <= max_damage and (allowed is None or allowed(trial))
        ),
        levels=levels,
    )
    return Choice(ratios, current, predicted_damage(curves, ratios))


def damage_budgets(max_damage: float, fine_tunes: bool, tries: int = 3) -> list[float]:
    """The predicted-damage budgets to try in turn for a quality target (``max_accuracy_drop``),
    each verified on the evaluation data before the next, smaller one is tried.

    The curves predict the damage straight after pruning. Without fine-tuning that is what is
    judged, so the target itself comes first, then halves of it. With fine-tuning the verified
    drop is far smaller than the predicted one -- five epochs brought a residual CNN on the
    digits back to within 0.7 points of dense from a predicted 40-point drop (28% of its MACs)
    -- so budgeting the target itself prunes far less than the job could (74% of the MACs kept
    for a 1-point target, where 36% held it): the tries start optimistic, ``4**(tries - 1)``
    times the target, and fall by 4 to the target itself, where no recovery is assumed.

    Example:
        >>> damage_budgets(0.01, fine_tunes=True)
        [0.16, 0.04, 0.01]
        >>> damage_budgets(0.01, fine_tunes=False)
        [0.01, 0.005, 0.0025]
    """
    if fine_tunes:
        return [round(max_damage * 4.0**k, 12) for k in range(tries - 1, -1, -1)]
    return [max_damage / 2.0**k for k in range(tries)]


def _greedy(
    curves: Sequence[Curve],
    cost: Cost,
    step: float,
    sizes: Mapping[str, int] | None,
    done: Callable[[Mapping[str, float], float], bool],
    allowed: Callable[[Mapping[str, float]], bool] | None = None,
    levels: Mapping[str, Sequence[float]] | None = None,
) -> tuple[dict[str, float], float]:
    """From nothing pruned, give the next step to the unit with the least added damage per cost
    saved until ``done(ratios, cost)``, or no unit can step (or none is ``allowed`` to)."""
    ratios = {c.unit: 0.0 for c in curves}
    sizes = sizes or {}
    levels = levels or {}
    current = cost(ratios)
    while not done(ratios, current):
        best: tuple[float, float, str, float] | None = None
        for curve in curves:
            r = ratios[curve.unit]
            nxt = _next_ratio(
                r, step, sizes.get(curve.unit), curve.max_ratio, levels.get(curve.unit)
            )
            if nxt is None:
                continue
            trial = {**ratios, curve.unit: nxt}
            saved = current - cost(trial)
            if saved <= 0 or (allowed is not None and not allowed(trial)):
                continue
            harm = max(curve.at(nxt) - curve.at(r), 0.0)
            key = (harm / saved, -saved, curve.unit, nxt)
            if best is None or key < best:
                best = key
        if best is None:
            break
        ratios[best[2]] = best[3]
        current = cost(ratios)
    return ratios, current


def _give_back(
    curves: Sequence[Curve],
    cost: Cost,
    budget: float,
    ratios: dict[str, float],
    step: float,
    sizes: Mapping[str, int] | None,
    allowed: Callable[[Mapping[str, float]], bool] | None,
    levels: Mapping[str, Sequence[float]] | None = None,
) -> tuple[dict[str, float], float]:
    """Undo what the greedy's last step made unnecessary: a large item (a key/value group of a
    few, say) can overshoot the budget by far, and the small steps before it are then not
    needed. Repeatedly take back the one step (an item, ``step``, or down to the previous of a
    unit's ``levels``) that relieves the most predicted damage while the cost stays within
    ``budget``."""
    sizes = sizes or {}
    levels = levels or {}
    ratios = dict(ratios)
    while True:
        best: tuple[float, float, str, float] | None = None
        for curve in curves:
            r = ratios[curve.unit]
            prev = _previous_ratio(r, step, sizes.get(curve.unit), levels.get(curve.unit))
            if prev is None:
                continue
            trial = {**ratios, curve.unit: prev}
            if cost(trial) > budget + 1e-12 or (allowed is not None and not allowed(trial)):
                continue
            relief = curve.at(r) - curve.at(prev)
            key = (-relief, cost(trial), curve.unit, prev)
            if best is None or key < best:
                best = key
        if best is None:
            return ratios, cost(ratios)
        ratios[best[2]] = best[3]


def _exchange(
    curves: Sequence[Curve],
    cost: Cost,
    budget: float,
    ratios: dict[str, float],
    step: float,
    sizes: Mapping[str, int] | None,
    allowed: Callable[[Mapping[str, float]], bool] | None,
    levels: Mapping[str, Sequence[float]] | None,
    rounds: int = 64,
) -> tuple[dict[str, float], float]:
    """Trade steps between units while the predicted damage falls: give one step back to a
    unit and take from another as few steps as bring the cost within ``budget`` again. Whole
    items make the greedy's end state lumpy (a unit whose items are large stops it far under
    the budget, where three small items of another would have fitted at less damage); single
    exchanges repair that, each strictly lowering the predicted damage, so this ends."""
    sizes = sizes or {}
    levels = levels or {}
    for _ in range(rounds):
        base = predicted_damage(curves, ratios)
        best: tuple[float, dict[str, float]] | None = None
        for back in curves:
            prev = _previous_ratio(
                ratios[back.unit], step, sizes.get(back.unit), levels.get(back.unit)
            )
            if prev is None:
                continue
            for more in curves:
                if more is back:
                    continue
                trial = {**ratios, back.unit: prev}
                r: float | None = trial[more.unit]
                while r is not None and cost(trial) > budget + 1e-12:
                    r = _next_ratio(
                        r, step, sizes.get(more.unit), more.max_ratio, levels.get(more.unit)
                    )
                    if r is not None:
                        trial[more.unit] = r
                if cost(trial) > budget + 1e-12 or (allowed is not None and not allowed(trial)):
                    continue
                gain = base - predicted_damage(curves, trial)
                if gain > 1e-12 and (best is None or gain > best[0]):
                    best = (gain, trial)
        if best is None:
            break
        ratios = best[1]
    return ratios, cost(ratios)


def _previous_ratio(
    r: float, step: float, size: int | None, levels: Sequence[float] | None = None
) -> float | None:
    """The ratio one item (or ``step``, or one of ``levels``, or 0) below ``r``; None at 0."""
    if levels is not None:  # a fixed pattern (n:m): the level below, nothing between
        return max((x for x in (0.0, *levels) if x < r - 1e-12), default=None)
    if size is None:
        return round(max(r - step, 0.0), 6) if r > 0 else None
    have = removal_count(r, size)
    return (have - 1) / size if have > 0 else None


def uniform_to_budget(units: Sequence[str], cost: Cost, budget: float, top: float = 0.99) -> float:
    """The one ratio for every unit at which ``cost`` meets ``budget`` (bisection): the
    baseline the search is compared with."""
    lo, hi = 0.0, top
    if cost(dict.fromkeys(units, hi)) > budget:
        raise InvalidSpec(f"no uniform ratio up to {top} reaches {budget}", "pruning")
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(dict.fromkeys(units, mid)) > budget:
            lo = mid
        else:
            hi = mid
    return hi


def _next_ratio(
    r: float, step: float, size: int | None, top: float, levels: Sequence[float] | None = None
) -> float | None:
    """The next ratio after ``r``: ``step`` more, or, for a unit of ``size`` items, the next
    ratio that removes at least one more item (exactly k/size, so rounding cannot stall), or,
    for a unit with ``levels`` (a fixed pattern such as n:m), the next of them."""
    if levels is not None:
        return min((x for x in levels if x > r + 1e-12), default=None)
    if size is None:
        nxt = round(min(r + step, top), 6)
        return nxt if nxt > r else None
    have = removal_count(r, size)
    k = max(removal_count(r + step, size), have + 1)
    if k >= size or k / size > top + 1e-9:
        return None
    return k / size


def predicted_damage(curves: Sequence[Curve], ratios: Mapping[str, float]) -> float:
    return sum(c.at(ratios.get(c.unit, 0.0)) for c in curves)


def _curve(curves: Sequence[Curve], unit: str) -> Curve:
    return next(c for c in curves if c.unit == unit)
