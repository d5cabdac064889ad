"""Structured pruning on the exported graph: dependency groups, ranking, slicing, re-export.

The pass reads the ATen graph of ``program.module()`` itself (not module types), so it works on
custom layers as long as their ops are ones it understands; anything else makes the channels it
touches unprunable, reported with a reason, never a wrong model.

Example (no service needed)::

    import torch
    from core.structure import analyze, prune_program
    from core.spec import PruningSpec

    program = torch.export.load("resnet.pt2")
    spec = PruningSpec(criterion="l1", granularity="channel", sparsity=0.5)
    print([g.describe() for g in analyze(program.module()).groups])  # the pre-flight report
    pruned = prune_program(program, spec)   # a smaller ExportedProgram, same dynamic dims
    torch.export.save(pruned.program, "resnet-pruned.pt2")
"""

from core.structure.graph import (
    Analyzer,
    Blocked,
    ChannelGroup,
    GraphAnalysis,
    Label,
    Member,
    analyze,
    register_op,
    unregister_op,
)
from core.structure.prune import StructuredResult, plan_channels, prune_program

__all__ = [
    "Analyzer",
    "Blocked",
    "ChannelGroup",
    "GraphAnalysis",
    "Label",
    "Member",
    "StructuredResult",
    "analyze",
    "plan_channels",
    "prune_program",
    "register_op",
    "unregister_op",
]
