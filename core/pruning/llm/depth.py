"""Depth pruning's surgery: removing decoder layers from the model and renumbering the rest
(module paths and the KV cache's ``layer_idx``), with the config rewritten to match."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import nn

from core.pruning.llm.layers import DecoderLayer
from core.pruning.llm.llm_config import keep_layers


def drop_layers(net: nn.Module, layers: tuple[DecoderLayer, ...], kept: set[int]) -> dict[str, str]:
    """Remove the decoder layers not in ``kept`` and renumber the rest; old -> new paths of the
    layers that moved."""
    prefix = layers[0].name.rsplit(".", 1)[0]
    blocks = net.get_submodule(prefix)
    assert isinstance(blocks, nn.ModuleList)
    order = sorted(kept)
    new = nn.ModuleList([blocks[i] for i in order])
    parent_name, _, attr = prefix.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, new)
    renamed = {}
    for new_index, old_index in enumerate(order):
        for module in new[new_index].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                cast(Any, module).layer_idx = new_index  # the KV cache's slot
        if new_index != old_index:
            renamed[f"{prefix}.{old_index}"] = f"{prefix}.{new_index}"
    keep_layers(net, len(layers), order)
    return renamed


def renamed_path(name: str, renamed: Mapping[str, str]) -> str:
    for old, new in renamed.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return name
