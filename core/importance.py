"""Element importance: a score per weight, higher means keep.

For single weights every Lp norm ranks alike (|w|^p is monotone in |w|); the criteria differ once
weights are ranked in groups (channels, heads, blocks).
"""

from __future__ import annotations

import zlib

import torch

from core.spec import PruningSpec


def element_scores(name: str, weight: torch.Tensor, spec: PruningSpec) -> torch.Tensor:
    """Importance of each element of ``weight`` under ``spec.criterion``, as float32.

    ``random`` draws from a generator seeded by the spec's seed and the layer's name, so the same
    spec on the same model removes the same weights on every run and every machine.
    """
    w = weight.detach()
    if spec.criterion == "random":
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(w.shape, generator=generator, dtype=torch.float32)
    magnitude = w.abs().to(torch.float32)
    if spec.criterion == "l2":
        return magnitude.square_()
    if spec.criterion == "lp":
        assert spec.p is not None  # the spec's validator guarantees it
        return magnitude.pow_(spec.p)
    return magnitude


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
