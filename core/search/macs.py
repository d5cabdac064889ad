"""MACs per convolution and linear weight of a program, read off one forward pass."""

from __future__ import annotations

import torch
from torch.fx.passes.shape_prop import ShapeProp

from core.formats.base import ModelInfo
from core.formats.pt2.program import module_on, synthetic_inputs
from core.metrics import count_macs

_aten = torch.ops.aten
# Ops whose MACs are (output entries) x (weight entries per output channel): weight is args[1].
_WEIGHTED = {
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.convolution.default,
    _aten.linear.default,
}


def weight_macs(
    program: torch.export.ExportedProgram, info: ModelInfo
) -> tuple[dict[str, float], float]:
    """``({weight name: MACs per sample}, all MACs per sample)`` at batch 1."""
    module = module_on(program)
    inputs = synthetic_inputs(info.inputs, 1)
    ShapeProp(module).propagate(*inputs)
    per_weight: dict[str, float] = {}
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in _WEIGHTED:
            continue
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            continue
        shape = tuple(weight.meta["tensor_meta"].shape)
        per_output = float(torch.Size(shape[1:]).numel())
        name = str(weight.target)
        per_weight[name] = (
            per_weight.get(name, 0.0) + float(torch.Size(meta.shape).numel()) * per_output
        )
    total = float(count_macs(lambda: module(*inputs), 1))
    return per_weight, total
