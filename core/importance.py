"""Element importance: a score per weight, higher means keep, one registered scorer per criterion.

For single weights every Lp norm ranks alike (|w|^p is monotone in |w|); the criteria differ once
weights are ranked in groups (channels, heads, blocks).

Adding a criterion that scores single weights: a function decorated with
``@element_score("name")`` here (or in a module of its own), and its entry in
:mod:`core.criteria`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from core.spec import PruningSpec

ElementScore = Callable[[str, torch.Tensor, PruningSpec], torch.Tensor]
_SCORERS: dict[str, ElementScore] = {}


def element_score(*names: str) -> Callable[[ElementScore], ElementScore]:
    """Register a scorer ``(layer name, weight, spec) -> float32 scores`` for ``names``."""

    def register(fn: ElementScore) -> ElementScore:
        for name in names:
            _SCORERS[name] = fn
        return fn

    return register


def element_scorers() -> dict[str, ElementScore]:
    """Every registered element scorer by criterion."""
    return dict(_SCORERS)


def element_scores(name: str, weight: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    """Importance of each element of ``weight`` under ``spec.criterion``, as float32."""
    return _SCORERS[spec.criterion](name, weight.detach(), spec)


@element_score("l1")
def _l1(name: str, w: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    return w.abs().to(torch.float32)


@element_score("l2")
def _l2(name: str, w: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    return w.abs().to(torch.float32).square_()


@element_score("lp")
def _lp(name: str, w: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    assert spec.p is not None  # the spec's validator guarantees it
    return w.abs().to(torch.float32).pow_(spec.p)


@element_score("random")
def _random(name: str, w: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    """Seeded by the spec's seed and the layer's name, so the same spec on the same model removes
    the same weights on every run and every machine."""
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.rand(w.shape, generator=generator, dtype=torch.float32)


@element_score("lamp")
def _lamp(name: str, w: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    return lamp_scores(w)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """Layer-adaptive magnitude (LAMP, Lee et al. 2021): ``w_u^2 / sum(w_v^2, |w_v| >= |w_u|)``.

    Comparable across layers, so one global ranking respects each layer's own weight scale: a
    layer's largest weight always scores 1, and no layer can be wiped out by a global threshold.
    """
    squares = weight.detach().to(torch.float32).reshape(-1).square()
    order = torch.argsort(squares)
    sorted_sq = squares[order]
    # Suffix sums over the ascending order: everything at least as large as this weight.
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = sorted_sq / suffix.clamp_min(torch.finfo(torch.float32).tiny)
    return scores.reshape(weight.shape)
