"""What the sensitivity scan prunes one at a time, per granularity, found by registration.

A *unit* is one ranking pool the spec's ``layer_sparsity`` can address by name: a layer's
weights (``unstructured``, ``n:m``), or a channel group named by its first layer (``channel``,
``head``). A :class:`UnitFamily` lists a model's units, says which ratios the scan tries, prunes
one unit alone at a ratio (a runnable copy, the program itself untouched), builds the cost model
the allocation budgets with, and turns the chosen ratios into the spec the pruner runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Protocol

import torch

from core.errors import InvalidSpec
from core.formats.base import ModelInfo
from core.search.cost import CostModel
from core.spec import DEFAULT_GRID, PruningSpec

Program = torch.export.ExportedProgram


@dataclass(frozen=True)
class ScanUnit:
    """One ranking pool: ``key`` is the name ``layer_sparsity`` addresses it by, ``size`` the
    items ranked in it (weights, channels or heads)."""

    key: str
    layers: tuple[str, ...]
    size: int


class UnitFamily(Protocol):
    """Scan units of the models of one format, at some granularities. ``program`` is the model
    as the format loads it (an ``ExportedProgram`` for ``pt2``). A family that subclasses this
    protocol inherits :meth:`grid` and :meth:`with_ratios` (any ratio, by ``layer_sparsity``)."""

    format: ClassVar[str]
    granularities: ClassVar[frozenset[str]]

    def units(
        self, program: Any, info: ModelInfo, spec: PruningSpec, calibration: Calibration
    ) -> list[ScanUnit]:
        """The units a target may prune: not excluded, not fixed by a ``layer_sparsity`` glob,
        rankable by the criterion."""
        ...

    def prune_one(
        self,
        program: Any,
        info: ModelInfo,
        spec: PruningSpec,
        unit: ScanUnit,
        ratio: float,
        calibration: Calibration,
    ) -> Any:
        """A runnable copy of the program with only ``unit`` pruned at ``ratio`` (or, for a
        format whose scanner restores the model after each cell, the model pruned in place)."""
        ...

    def cost_model(
        self, program: Any, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        """MACs and parameters as functions of the units' ratios."""
        ...

    def grid(self, spec: PruningSpec) -> tuple[float, ...]:
        """The ratios each unit is scanned at: ``search.grid``, default 0.1, 0.2, ..., 0.9.

        Raises:
            InvalidSpec: the granularity cannot use the grid asked for.
        """
        return spec.search.grid if spec.search is not None else DEFAULT_GRID

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        """The spec the pruner runs for the chosen ``ratios`` (unit key -> ratio)."""
        return with_ratios(spec, ratios)

    def check(self, spec: PruningSpec) -> None:
        """Refuse, from the spec alone (no model), a search this family cannot run: by default
        a grid it cannot use (:meth:`grid`).

        Raises:
            InvalidSpec: with ``field`` the spec's path that is at fault.
        """
        self.grid(spec)


Calibration = tuple[torch.Tensor, ...] | None

_FAMILIES: dict[tuple[str, str], UnitFamily] = {}


def register_family(family: UnitFamily) -> UnitFamily:
    """Make ``family`` the scan units of each of its (format, granularity) pairs."""
    for granularity in family.granularities:
        _FAMILIES[(family.format, granularity)] = family
    return family


def family_for(fmt: str, granularity: str) -> UnitFamily:
    """The scan units for ``granularity`` on ``fmt`` models.

    Raises:
        InvalidSpec: the search cannot scan that pair (the sentence names those it can).
    """
    import core.search.builtin  # noqa: F401  (registers the built-in families once)

    found = _FAMILIES.get((fmt, granularity))
    if found is None:
        able = sorted(f"{g} ({f})" for f, g in _FAMILIES)
        raise InvalidSpec(
            f"a target cannot be searched at granularity {granularity!r} on {fmt!r} models; "
            f"it can at: {', '.join(able)}",
            "pruning",
        )
    return found


def escape_glob(name: str) -> str:
    """``name`` as a glob that matches exactly it (``layer_sparsity`` keys are globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def with_ratios(spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
    """``spec`` with ``ratios`` (unit key -> ratio) as exact ``layer_sparsity`` entries after the
    user's own globs, every other unit at 0, and no target: the spec the pruner runs."""
    chosen = {escape_glob(key): ratio for key, ratio in ratios.items()}
    # The user's overrides come first (first match wins); the searched units never match them.
    merged = {
        **spec.layer_sparsity,
        **{k: v for k, v in chosen.items() if k not in spec.layer_sparsity},
    }
    return spec.model_copy(
        update={"layer_sparsity": merged, "sparsity": 0.0, "target": None, "search": None}
    )


def fixed_by_user(spec: PruningSpec, names: tuple[str, ...]) -> bool:
    """Whether the user's ``exclude`` or ``layer_sparsity`` already decides this unit."""
    patterns = [*spec.exclude, *spec.layer_sparsity]
    return any(fnmatchcase(name, p) for name in names for p in patterns)


class UnitsOfScanner:
    """What every scanner shares over the model its family reads (``subject``): the grid, the
    units in graph order, one unit by key, and the cost model. A scanner is a dataclass with
    ``info``, ``spec``, ``calibration``, ``family`` and ``_units``."""

    info: Any
    spec: Any
    calibration: Any
    family: UnitFamily
    _units: list[ScanUnit] | None

    def __post_init__(self) -> None:
        self.family = family_for(self.info.format, self.spec.pruning.granularity)

    @property
    def subject(self) -> Any:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[float, ...]:
        return self.family.grid(self.spec.pruning)

    def units(self) -> list[ScanUnit]:
        """The units the target may prune, in graph order."""
        if self._units is None:
            self._units = self.family.units(
                self.subject, self.info, self.spec.pruning, self.calibration
            )
        return self._units

    def unit(self, key: str) -> ScanUnit:
        return next(u for u in self.units() if u.key == key)

    def cost_model(self) -> Any:
        return self.family.cost_model(self.subject, self.info, self.spec.pruning, self.units())
