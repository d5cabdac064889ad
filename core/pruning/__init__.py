"""Pruners, one per (model format, granularity), found by registration.

Example (no service needed)::

    from core.formats import detect
    from core.pruning import PruneContext, pruner_for, run_rounds
    from core.spec import PruningSpec

    fmt = detect("resnet.pt2")
    program, info = fmt.load("resnet.pt2")
    spec = PruningSpec(criterion="l1", granularity="channel", sparsity=0.5)
    outcome = run_rounds(pruner_for(fmt.name, spec.granularity), program, info, spec,
                         PruneContext())
    print(outcome.params_after, [layer.shape_after for layer in outcome.layers])

Adding a pruner is one module that defines a class satisfying :class:`Pruner` and one line in
:mod:`core.pruning.builtin`; see ``docs/architecture.md``.
"""

from core.pruning.base import (
    LayerResult,
    PruneContext,
    PruneOutcome,
    Pruner,
    preflight,
    pruner_for,
    pruners,
    register_pruner,
)
from core.pruning.rounds import RoundHook, run_rounds

__all__ = [
    "LayerResult",
    "PruneContext",
    "PruneOutcome",
    "Pruner",
    "RoundHook",
    "preflight",
    "pruner_for",
    "pruners",
    "register_pruner",
    "run_rounds",
]
