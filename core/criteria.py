"""The importance criteria Shears knows: which granularities each ranks and whether it needs data.

This table is the one declaration the spec's validators, the API's checks and the scorers
derive from. It holds facts only (no torch): scorers register themselves against these names
(:func:`core.importance.element_score`, :func:`core.structure.importance.group_score`),
and a test checks that every granularity a criterion claims has a scorer.

Adding a criterion: one entry here, plus its scorer module (see ``docs/architecture.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Granularities that zero single weights in place (the model keeps its shapes).
WEIGHT_GRANULARITIES: frozenset[str] = frozenset({"unstructured", "n:m", "block"})
# Granularities that remove whole channels or heads physically: the model gets smaller.
STRUCTURED_GRANULARITIES: frozenset[str] = frozenset({"channel", "head"})


@dataclass(frozen=True)
class CriterionInfo:
    """One criterion: what it ranks and what it needs."""

    name: str
    granularities: frozenset[str]
    needs_data: bool = False
    description: str = ""
    # The model formats whose pruners rank by it.
    formats: frozenset[str] = frozenset({"pt2"})

    @property
    def structured_only(self) -> bool:
        return self.granularities <= STRUCTURED_GRANULARITIES | {"width", "depth"}


_ALL = WEIGHT_GRANULARITIES | STRUCTURED_GRANULARITIES
_LLM_WEIGHTS = frozenset({"unstructured", "n:m"})
_LLM_STRUCTURE = frozenset({"width", "depth"})
_HF = frozenset({"hf"})

CRITERIA: dict[str, CriterionInfo] = {
    c.name: c
    for c in (
        CriterionInfo("l1", _ALL, description="|w|; a channel sums it over its filters"),
        CriterionInfo("l2", _ALL, description="w^2; a channel sums it over its filters"),
        CriterionInfo("lp", _ALL, description="|w|^p, with `p`"),
        CriterionInfo(
            "group_l1",
            STRUCTURED_GRANULARITIES,
            description="|w| over every coupled layer of a channel (producers, consumers, norms)",
        ),
        CriterionInfo(
            "group_l2",
            STRUCTURED_GRANULARITIES,
            description="w^2 over every coupled layer of a channel (Torch-Pruning's group "
            "magnitude)",
        ),
        CriterionInfo(
            "random",
            _ALL | _LLM_STRUCTURE,
            description="seeded random ranking, with `seed`",
            formats=frozenset({"pt2", "hf"}),
        ),
        CriterionInfo(
            "lamp",
            frozenset({"unstructured"}),
            description="layer-adaptive magnitude, comparable across layers",
        ),
        CriterionInfo(
            "bn_scale",
            STRUCTURED_GRANULARITIES,
            description="|gamma| of the norm after each channel (network slimming)",
        ),
        CriterionInfo(
            "apoz",
            STRUCTURED_GRANULARITIES,
            needs_data=True,
            description="average share of zero activations",
        ),
        CriterionInfo(
            "regression",
            STRUCTURED_GRANULARITIES,
            needs_data=True,
            description="least-squares reconstruction of the next layer's input",
        ),
        CriterionInfo(
            "taylor",
            STRUCTURED_GRANULARITIES | _LLM_STRUCTURE,
            needs_data=True,
            description="first-order Taylor estimate of the loss change",
            formats=frozenset({"pt2", "hf"}),
        ),
        # Language models (``hf``): ranked within each output row of a linear layer.
        CriterionInfo(
            "magnitude",
            _LLM_WEIGHTS | {"width"},
            description="|W|, compared within each output row (width: a unit's weights' norm)",
            formats=_HF,
        ),
        CriterionInfo(
            "activation",
            _LLM_STRUCTURE,
            needs_data=True,
            description="mean |activation| of each MLP neuron, head and hidden channel over the "
            "calibration tokens (Minitron); for depth, 1 - cosine of a layer's input and output",
            formats=_HF,
        ),
        CriterionInfo(
            "wanda",
            _LLM_WEIGHTS,
            needs_data=True,
            description="|W| x the L2 norm of each input feature over the calibration tokens",
            formats=_HF,
        ),
        CriterionInfo(
            "sparsegpt",
            _LLM_WEIGHTS,
            needs_data=True,
            description="OBS reconstruction from the calibration Hessian, kept weights updated",
            formats=_HF,
        ),
    )
}


def criterion_info(name: str) -> CriterionInfo:
    """The registered criterion ``name`` (``KeyError`` if unknown)."""
    return CRITERIA[name]


def needs_data(name: str) -> bool:
    """Whether the criterion runs the model on calibration data."""
    return CRITERIA[name].needs_data


def fits_format(name: str, fmt: str) -> str | None:
    """``None`` when ``name`` ranks models of format ``fmt``, else a sentence saying what to use."""
    if fmt in CRITERIA[name].formats:
        return None
    usable = sorted(c.name for c in CRITERIA.values() if fmt in c.formats)
    return (
        f"criterion {name!r} is not available for {fmt!r} models; use one of: {', '.join(usable)}"
    )


def fits_granularity(name: str, granularity: str) -> str | None:
    """``None`` when ``name`` ranks at ``granularity``, else a sentence saying what to use."""
    info = CRITERIA[name]
    if granularity in info.granularities:
        return None
    choices = " or ".join(repr(g) for g in sorted(info.granularities))
    what = "whole channels, heads or layers" if info.structured_only else "single weights"
    return f"criterion {name!r} ranks {what}; use granularity {choices}"
