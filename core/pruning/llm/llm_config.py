"""The config side of structured pruning: checking that the config class accepts the new
sizes before any weight changes, and rewriting sizes, layer counts and per-layer lists so the
saved checkpoint loads with stock ``from_pretrained``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from core.errors import InvalidSpec

# Config lists with one entry per decoder layer, cut to the kept layers by depth pruning.
PER_LAYER_LISTS = frozenset({"layer_types", "no_rope_layers"})


def check_config(net: nn.Module, **sizes: int) -> None:
    """Raise ``InvalidSpec`` unless the config class accepts the new sizes (transformers checks,
    for instance, that ``hidden_size`` is a multiple of ``num_attention_heads``)."""
    check_config_sizes(net.config, **sizes)


def check_config_sizes(config: Any, **sizes: int) -> None:
    """:func:`check_config` on a config alone (a search asks before any model is pruned)."""
    try:
        type(config).from_dict({**config.to_dict(), **sizes})
    except Exception as exc:
        raise InvalidSpec(
            f"these width fractions give sizes {sizes} that {type(config).__name__} refuses "
            f"({str(exc).strip()}); choose other fractions"
        ) from exc


def write_sizes(net: nn.Module, **sizes: int) -> None:
    """Set the new sizes (``hidden_size``, ``intermediate_size``, head counts...) on the
    model's config."""
    config: Any = net.config
    for key, value in sizes.items():
        setattr(config, key, value)


def keep_layers(net: nn.Module, count: int, kept: Sequence[int]) -> None:
    """``num_hidden_layers`` and every per-layer config list cut to the ``kept`` layers of
    ``count``."""
    config: Any = net.config
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):
        if key in PER_LAYER_LISTS and isinstance(value, list) and len(value) == count:
            setattr(config, key, [value[i] for i in kept])
