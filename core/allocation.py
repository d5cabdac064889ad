"""Who is pruned, and from which ranking pool: the spec's globs, overrides, scope and caps applied
to real units -- the weights of layers, or the channels (heads) of dependency groups.

One allocator serves every pruner and the API's pre-flight check, so they cannot disagree on
which globs match, which ratio a unit gets or whether a global ratio is reachable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from core.errors import InvalidSpec
from core.spec import PruningSpec


def removal_count(sparsity: float, n: int) -> int:
    """How many of ``n`` units a pool at ``sparsity`` loses: round(sparsity * n), halves up."""
    return math.floor(sparsity * n + 0.5)


@dataclass(frozen=True)
class Unit:
    """Something ranked as one pool of ``size`` items (weights, channels or heads).

    ``names`` are the layers it belongs to: ``exclude`` globs match any of them, and a
    ``layer_sparsity`` override applies by the first (a channel group follows its first layer).
    ``min_keep`` items always survive (a channel group keeps one channel).
    """

    key: str
    size: int
    names: tuple[str, ...]
    min_keep: int = 0


@dataclass(frozen=True)
class Allocation:
    """The ranking pools of one pruning step.

    ``per_layer`` maps a unit to its own sparsity (scope ``layer``, or an override under
    ``global``); ``global_pool`` lists the units ranked together, which lose ``global_removals``
    items between them, none more than its ``global_caps`` entry. Excluded units appear in
    neither.
    """

    per_layer: dict[str, float] = field(default_factory=dict)
    global_pool: tuple[str, ...] = ()
    global_removals: int = 0
    global_caps: dict[str, int] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()
    # How many items each unit must keep (absent: none); bounds per-unit removals.
    min_keep: dict[str, int] = field(default_factory=dict)

    def removals(self, key: str, size: int) -> int:
        """How many of a ``per_layer`` unit's ``size`` items go."""
        return min(removal_count(self.per_layer[key], size), size - self.min_keep.get(key, 0))


def first_match(name: str, patterns: Sequence[str]) -> str | None:
    """The first glob of ``patterns`` that ``name`` matches."""
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def check_patterns(spec: PruningSpec, layer_names: Sequence[str]) -> None:
    """Refuse ``exclude`` and ``layer_sparsity`` globs that match no layer: a typo would
    otherwise silently prune what the user meant to protect.

    Raises:
        InvalidSpec: naming the globs and the layers there are.
    """
    for kind, patterns in (
        ("exclude", spec.exclude),
        ("layer_sparsity", list(spec.layer_sparsity)),
    ):
        unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in layer_names)]
        if unmatched:
            raise InvalidSpec(
                f"{kind} pattern(s) {unmatched} match no prunable layer; "
                f"the layers are: {', '.join(layer_names) or '(none)'}"
            )


def allocate_units(
    spec: PruningSpec,
    units: Sequence[Unit],
    *,
    item: str = "weights",
    layer_names: Sequence[str] | None = None,
) -> Allocation:
    """Split ``units`` (in graph order) into ranking pools.

    ``layer_names`` are what the globs are checked against (default: every unit's names).

    Raises:
        InvalidSpec: a glob matches no layer, or the global sparsity cannot be reached without
            pushing a unit past ``max_layer_sparsity`` (or below its ``min_keep``).
    """
    check_patterns(spec, layer_names or [n for u in units for n in u.names])
    overrides = list(spec.layer_sparsity)
    excluded: list[str] = []
    per_layer: dict[str, float] = {}
    pool: list[Unit] = []
    for unit in units:
        if any(first_match(name, spec.exclude) for name in unit.names):
            excluded.append(unit.key)
            continue
        override = first_match(unit.names[0], overrides) if unit.names else None
        if override is not None:
            per_layer[unit.key] = spec.layer_sparsity[override]
        elif spec.scope == "global":
            pool.append(unit)
        else:
            per_layer[unit.key] = spec.sparsity
    total = sum(u.size for u in pool)
    removals = removal_count(spec.sparsity, total) if pool else 0
    caps = {u.key: min(int(spec.max_layer_sparsity * u.size), u.size - u.min_keep) for u in pool}
    if sum(caps.values()) < removals:
        keeps = " (each keeps at least one)" if any(u.min_keep for u in pool) else ""
        raise InvalidSpec(
            f"global sparsity {spec.sparsity} removes {removals} of {total} {item} but "
            f"max_layer_sparsity {spec.max_layer_sparsity} allows only {sum(caps.values())}"
            f"{keeps}; raise max_layer_sparsity or lower sparsity"
        )
    return Allocation(
        per_layer=per_layer,
        global_pool=tuple(u.key for u in pool),
        global_removals=removals,
        global_caps=caps,
        excluded=tuple(excluded),
        min_keep={u.key: u.min_keep for u in units if u.min_keep},
    )


def allocate(spec: PruningSpec, layer_sizes: Mapping[str, int]) -> Allocation:
    """Split layers (name -> number of weights, in graph order) into ranking pools of weights.

    Example:
        >>> allocate(PruningSpec(criterion="l1", granularity="unstructured", sparsity=0.5,
        ...                      scope="global"), {"conv": 100, "fc": 20}).global_removals
        60
    """
    return allocate_units(spec, [Unit(name, size, (name,)) for name, size in layer_sizes.items()])
