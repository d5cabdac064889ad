"""Who is pruned, and from which ranking pool: the spec's globs and scope applied to real layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from core.errors import InvalidSpec
from core.spec import PruningSpec


def removal_count(sparsity: float, n: int) -> int:
    """How many of ``n`` weights a pool at ``sparsity`` loses: round(sparsity * n), halves up."""
    return math.floor(sparsity * n + 0.5)


@dataclass(frozen=True)
class Allocation:
    """The ranking pools of one pruning step.

    ``per_layer`` maps a layer to its own sparsity (scope ``layer``, or an override under
    ``global``); ``global_pool`` lists the layers ranked together, which lose ``global_removals``
    weights between them, none more than its ``global_caps`` entry. Excluded layers appear in
    neither.
    """

    per_layer: dict[str, float] = field(default_factory=dict)
    global_pool: tuple[str, ...] = ()
    global_removals: int = 0
    global_caps: dict[str, int] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()


def _first_match(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def _check_patterns_match(kind: str, patterns: Sequence[str], layer_names: Sequence[str]) -> None:
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in layer_names)]
    if unmatched:
        raise InvalidSpec(
            f"{kind} pattern(s) {unmatched} match no prunable layer; "
            f"the layers are: {', '.join(layer_names) or '(none)'}"
        )


def allocate(spec: PruningSpec, layer_sizes: Mapping[str, int]) -> Allocation:
    """Split the layers (name -> number of weights, in graph order) into ranking pools.

    Raises:
        InvalidSpec: a glob in ``exclude`` or ``layer_sparsity`` matches no layer (a typo would
            otherwise silently prune what the user meant to protect), or the global sparsity
            cannot be reached without pushing a layer past ``max_layer_sparsity``.
    """
    layer_names = list(layer_sizes)
    _check_patterns_match("exclude", spec.exclude, layer_names)
    _check_patterns_match("layer_sparsity", list(spec.layer_sparsity), layer_names)

    excluded = tuple(n for n in layer_names if _first_match(n, spec.exclude) is not None)
    per_layer: dict[str, float] = {}
    pool: list[str] = []
    for name in layer_names:
        if name in excluded:
            continue
        override = _first_match(name, list(spec.layer_sparsity))
        if override is not None:
            per_layer[name] = spec.layer_sparsity[override]
        elif spec.scope == "global":
            pool.append(name)
        else:
            per_layer[name] = spec.sparsity
    total = sum(layer_sizes[n] for n in pool)
    removals = removal_count(spec.sparsity, total) if pool else 0
    caps = {n: int(spec.max_layer_sparsity * layer_sizes[n]) for n in pool}
    if sum(caps.values()) < removals:
        raise InvalidSpec(
            f"global sparsity {spec.sparsity} removes {removals} of {total} weights but "
            f"max_layer_sparsity {spec.max_layer_sparsity} allows only {sum(caps.values())}; "
            "raise max_layer_sparsity or lower sparsity"
        )
    return Allocation(
        per_layer=per_layer,
        global_pool=tuple(pool),
        global_removals=removals,
        global_caps=caps,
        excluded=excluded,
    )
