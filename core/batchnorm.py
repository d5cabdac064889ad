"""Re-estimating the BatchNorm statistics of a pruned ``torch.export`` program.

Why: removing weights or channels shifts every activation after them, but the running mean and
variance each BatchNorm normalises with were measured on the dense model. Until they are
re-estimated the pruned model is scored, and starts fine-tuning, with stale statistics (the shared
notes, fact 11). A few hundred training samples through the graph with BatchNorm in train mode
and no gradients measure them again; dropout stays in eval mode.

How: every ``aten.batch_norm`` node is switched to ``training=True, momentum=1.0``, so after each
chunk its running buffers hold exactly that chunk's mean and unbiased variance; the chunks'
statistics are averaged, weighted by their sizes (what ``momentum=None`` does in eager PyTorch),
and written into ``program.state_dict``. One chunk (the default when the samples fit one batch)
gives the exact statistics of the samples.

Example::

    from core.batchnorm import reestimate_batchnorm

    changed = reestimate_batchnorm(program, (images[:256],), batch_size=256)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.formats.pt2.program import module_on

__all__ = ["batchnorm_buffers", "reestimate_batchnorm"]

_BATCH_NORM = torch.ops.aten.batch_norm.default
_TRAINING, _MOMENTUM = 5, 6  # aten.batch_norm(input, w, b, mean, var, training, momentum, eps, ..)


def batchnorm_buffers(module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str, str]]:
    """Each BatchNorm node with the names of its running mean and variance buffers (nodes whose
    statistics are not module buffers -- none in exported programs -- are left out)."""
    found = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target != _BATCH_NORM:
            continue
        mean, var = node.args[3], node.args[4]
        if (
            isinstance(mean, torch.fx.Node)
            and isinstance(var, torch.fx.Node)
            and mean.op == "get_attr"
            and var.op == "get_attr"
        ):
            found.append((node, str(mean.target), str(var.target)))
    return found


def reestimate_batchnorm(
    program: torch.export.ExportedProgram,
    inputs: Sequence[torch.Tensor],
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> int:
    """Measure every BatchNorm's running statistics again on ``inputs`` (one tensor per program
    input, samples first), in ``batch_size`` chunks; returns how many BatchNorms changed.

    The program's graph is untouched: only its ``running_mean``/``running_var`` buffers change.
    """
    module = module_on(program, device)
    norms = batchnorm_buffers(module)
    if not norms or not inputs or inputs[0].shape[0] < 2:
        return 0
    for node, _, _ in norms:
        node.update_arg(_TRAINING, True)
        node.update_arg(_MOMENTUM, 1.0)
    module.recompile()

    n = inputs[0].shape[0]
    # Chunks of nearly equal size, none above batch_size: no chunk of one sample, whose
    # unbiased variance is undefined.
    count = -(-n // max(batch_size, 1))
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for part in zip(*(t.tensor_split(count) for t in inputs), strict=True):
            chunk = [t.to(device) for t in part]
            rows = chunk[0].shape[0]
            module(*chunk)
            for _, mean, var in norms:
                for name in (mean, var):
                    value = module.get_buffer(name).detach().double() * rows
                    sums[name] = sums[name] + value if name in sums else value
        state = program.state_dict
        for name, total in sums.items():
            state[name].copy_((total / n).to(state[name].dtype))
    return len(norms)
