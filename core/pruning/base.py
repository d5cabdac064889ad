"""The pruner contract: what a pruner is given, what it returns, and how one is found."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from core.criteria import fits_format
from core.errors import InvalidSpec
from core.formats.base import ModelInfo
from core.spec import PruningSpec


@dataclass(frozen=True)
class LayerResult:
    """One prunable layer before and after."""

    name: str
    kind: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params: int
    nonzero: int
    sparsity: float


@dataclass(frozen=True)
class PruneContext:
    """What a pruning step may use besides the model: calibration inputs for the data-aware
    criteria (one tensor per model input, samples first), and whether it is only a dry run
    (plan and report, change nothing)."""

    calibration: tuple[torch.Tensor, ...] | None = None
    dry_run: bool = False


@dataclass
class PruneOutcome:
    """What one pruning step (or a whole schedule of them) did.

    ``model`` is the pruned model (the input itself for a dry run). ``kept_out``/``kept_in``
    name, per layer that lost some, the kept output channels and weight input columns as
    indices into the uploaded model. ``details`` is pruner-specific JSON for the report (the
    channel groups, say).
    """

    model: Any
    layers: tuple[LayerResult, ...]
    params_after: int
    nonzero_params_after: int
    sparse_size_bytes: int
    excluded: tuple[str, ...] = ()
    kept_out: dict[str, list[int]] = field(default_factory=dict)
    kept_in: dict[str, list[int]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Pruner(Protocol):
    """Prunes models of one format at some granularities.

    ``prune`` performs one step at the ratios of ``spec`` (the rounds driver scales them per
    round with :meth:`round_spec`). It must remove exactly what the spec says -- in each ranking
    pool of N, ``round(s x N)`` -- and leave a model the format can save and load again.
    """

    format: ClassVar[str]
    granularities: ClassVar[frozenset[str]]

    def preflight(self, spec: PruningSpec, layers: Mapping[str, int]) -> None:
        """Check ``spec`` against the upload's prunable layers (name -> weights) from metadata
        alone, before any worker loads the model. Raises ``InvalidSpec``."""
        ...

    def round_spec(self, spec: PruningSpec, before: float, after: float) -> PruningSpec:
        """The spec of the round that takes the model from ``before`` to ``after`` (shares of
        the final ratios) in an iterative schedule."""
        ...

    def prune(
        self, model: Any, info: ModelInfo, spec: PruningSpec, ctx: PruneContext
    ) -> PruneOutcome:
        """One pruning step."""
        ...

    def hold_zeros(self, model: Any, info: ModelInfo) -> Callable[[Any], None]:
        """Remember which prunable weights are zero now; the returned function zeroes them again
        in a (possibly retrained) model. Called around the hook between rounds."""
        ...


_PRUNERS: dict[tuple[str, str], Pruner] = {}
_BUILTIN = "core.pruning.builtin"


def register_pruner(pruner: Pruner) -> Pruner:
    """Make ``pruner`` the one for each of its (format, granularity) pairs."""
    for granularity in pruner.granularities:
        _PRUNERS[(pruner.format, granularity)] = pruner
    return pruner


def pruners() -> dict[tuple[str, str], Pruner]:
    """Every registered pruner by (format, granularity)."""
    importlib.import_module(_BUILTIN)  # registers the built-in pruners once
    return dict(_PRUNERS)


def pruner_for(fmt: str, granularity: str) -> Pruner:
    """The pruner for ``granularity`` on models of format ``fmt``.

    Raises:
        InvalidSpec: no pruner handles that pair (the sentence names those that exist).
    """
    registered = pruners()
    found = registered.get((fmt, granularity))
    if found is None:
        available = sorted(g for f, g in registered if f == fmt)
        raise InvalidSpec(
            f"granularity {granularity!r} is not available for {fmt!r} models; "
            f"available: {', '.join(available) or '(none)'}"
        )
    return found


def preflight(fmt: str, spec: PruningSpec, layers: Mapping[str, int]) -> None:
    """What the API can check before queueing a job: a pruner exists for the model's format and
    the spec's granularity, and the spec fits the model's prunable layers.

    Raises:
        InvalidSpec: naming what does not fit.
    """
    misfit = fits_format(spec.criterion, fmt)
    if misfit is not None:
        raise InvalidSpec(misfit)
    pruner_for(fmt, spec.granularity).preflight(spec, layers)
