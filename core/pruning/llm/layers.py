"""Where a causal language model keeps its decoder layers and the linear weights inside them.

Works on any ``torch.nn.Module`` laid out like the ``transformers`` causal LMs (Llama, Mistral,
Qwen2/3: ``model.layers``; GPT-2: ``transformer.h``): the decoder layers are the largest
``ModuleList`` of identical blocks, and the prunable layers are the linear modules inside them --
``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is stored ``(in, out)``). Embeddings, norms and
``lm_head`` sit outside the decoder layers and are never prunable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.errors import PruningError


@dataclass(frozen=True)
class Linear:
    """One prunable linear module: its path in the model, the module, and how its weight is
    stored (``transposed``: ``(in, out)`` as in GPT-2's ``Conv1D``)."""

    name: str
    module: nn.Module
    transposed: bool

    @property
    def weight(self) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, however the weight is stored."""
        rows, cols = self.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """A copy of the weight as ``(out, in)`` in ``dtype``."""
        w = self.weight.detach()
        return (w.t() if self.transposed else w).to(dtype=dtype, copy=True).contiguous()

    def assign(self, matrix: torch.Tensor) -> None:
        """Write an ``(out, in)`` matrix back into the weight (its own dtype and layout)."""
        with torch.no_grad():
            self.weight.copy_(matrix.t() if self.transposed else matrix)


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer: its path, the module and its prunable linears in module order."""

    name: str
    module: nn.Module
    linears: tuple[Linear, ...]


def unwrap(model: object) -> nn.Module:
    """The ``transformers`` model itself: ``model`` when it is a module, else its ``.model``
    (the ``hf`` format's loaded-model object holds it there)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise PruningError(
        f"expected a transformers model or an object whose .model is one, got {type(model)!r}"
    )


def _is_linear(module: nn.Module) -> tuple[bool, bool]:
    """(prunable linear, stored transposed)."""
    if isinstance(module, nn.Linear):
        return True, False
    # transformers.pytorch_utils.Conv1D, matched by name so this module needs no transformers
    # import: a 2-D weight (in, out) plus nf, the output width.
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    ):
        return True, True
    return False, False


def decoder_layers(model: nn.Module) -> tuple[DecoderLayer, ...]:
    """The decoder layers of ``model`` in order, each with its prunable linears.

    Raises:
        PruningError: the model has no ``ModuleList`` of identical blocks holding linears.
    """
    best: tuple[str, nn.ModuleList] | None = None
    best_params = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    if best is None:
        raise PruningError("found no decoder layers (a ModuleList of identical blocks)")
    prefix, blocks = best
    layers = []
    for index, block in enumerate(blocks):
        path = f"{prefix}.{index}" if prefix else str(index)
        linears = []
        for sub, module in block.named_modules():
            linear, transposed = _is_linear(module)
            if linear and sub:
                linears.append(Linear(f"{path}.{sub}", module, transposed))
        layers.append(DecoderLayer(path, block, tuple(linears)))
    if not any(layer.linears for layer in layers):
        raise PruningError(f"the decoder layers under {prefix!r} hold no linear layers")
    return tuple(layers)


def prunable_linears(model: nn.Module) -> dict[str, Linear]:
    """Every prunable linear of ``model`` by module path, in model order."""
    return {lin.name: lin for layer in decoder_layers(model) for lin in layer.linears}
