"""Width slicing of a causal LM: how MLP neurons, key/value groups (with their query heads) and
hidden channels are cut in place out of the modules a registered layout
(:mod:`.layouts`) finds in each decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from core.errors import InvalidSpec
from core.pruning.llm.calibrate import LayerInputs
from core.pruning.llm.layers import DecoderLayer
from core.pruning.llm.layouts import Block, slice_linear


@dataclass(frozen=True)
class Heads:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def head_layout(net: nn.Module) -> Heads:
    config: Any = net.config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return Heads(heads, kv, int(head_dim))


def prune_width_layer(
    block: Block, heads: Heads, kept_mlp: torch.Tensor | None, kept_kv: torch.Tensor | None
) -> None:
    if kept_mlp is not None:
        block.mlp.keep(kept_mlp)
    if kept_kv is not None:
        attn = block.attention
        assert attn is not None  # the layout's refusals stop heads where there is no attention
        d = heads.head_dim
        kv_rows = (kept_kv[:, None] * d + torch.arange(d)).reshape(-1)
        q_heads = (kept_kv[:, None] * heads.group + torch.arange(heads.group)).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
        slice_linear(attn.q, q_rows, None)
        slice_linear(attn.k, kv_rows, None)
        slice_linear(attn.v, kv_rows, None)
        slice_linear(attn.o, None, q_rows)
        for name, value in (
            ("num_heads", len(q_heads)),
            ("num_key_value_heads", len(kept_kv)),
        ):
            if hasattr(attn.module, name):
                setattr(attn.module, name, value)


def is_norm(module: nn.Module, size: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        "norm" in type(module).__name__.lower()
        and isinstance(weight, torch.Tensor)
        and weight.shape == (size,)
    )


@dataclass(frozen=True)
class Hidden:
    """Everything that carries the hidden (residual) dimension: the input embedding, the norms
    on the residual stream (those of each decoder layer outside its attention and MLP, and the
    final one), the projections' hidden side and the output embedding (tied or not)."""

    size: int
    embed: nn.Embedding
    head: nn.Linear | None  # None when tied to ``embed``
    layer_norms: tuple[tuple[nn.Module, ...], ...]
    final_norms: tuple[nn.Module, ...]

    @classmethod
    def of(cls, net: nn.Module, layers: tuple[DecoderLayer, ...]) -> Hidden:
        embed = cast(Any, net).get_input_embeddings()
        head = cast(Any, net).get_output_embeddings()
        if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
            raise InvalidSpec("width needs an nn.Embedding input and an nn.Linear output head")
        size = int(embed.weight.shape[1])
        inside = {id(m) for layer in layers for m in layer.module.modules()}
        per_layer = tuple(
            tuple(
                m
                for name, m in layer.module.named_children()
                if name not in ("self_attn", "mlp") and is_norm(m, size)
            )
            for layer in layers
        )
        final = tuple(m for m in net.modules() if id(m) not in inside and is_norm(m, size))
        tied = head.weight is embed.weight
        return cls(size, embed, None if tied else head, per_layer, final)

    def norm_and_embedding_per_channel(self) -> int:
        """Parameters per hidden channel in the embeddings and every norm on the stream."""
        vocab = int(self.embed.weight.shape[0])
        head = int(self.head.weight.shape[0]) if self.head is not None else 0
        norms = (*(m for norms in self.layer_norms for m in norms), *self.final_norms)
        per_norm = sum(1 + int(isinstance(getattr(m, "bias", None), torch.Tensor)) for m in norms)
        return vocab + head + per_norm

    def magnitude(self) -> torch.Tensor:
        """Each channel's input-embedding column norm (what every token writes into it)."""
        return self.embed.weight.detach().double().square().sum(0).sqrt().cpu()

    @torch.no_grad()
    def activation(
        self, net: nn.Module, layers: tuple[DecoderLayer, ...], inputs: LayerInputs
    ) -> torch.Tensor:
        """Mean |x| of every residual norm's output per channel, layer by layer."""
        total = torch.zeros(self.size, dtype=torch.float64)
        count = 0

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            nonlocal total, count
            x = out.detach().reshape(-1, self.size)
            total += x.abs().sum(0, dtype=torch.float64).cpu()
            count += int(x.shape[0])

        for layer, norms in zip(layers, self.layer_norms, strict=True):
            handles = [m.register_forward_hook(hook) for m in norms]
            try:
                inputs.advance(layer.module)
            finally:
                for handle in handles:
                    handle.remove()
        for norm in self.final_norms:
            hook(norm, (), norm(inputs.hidden))
        return total / max(count, 1)

    def prune(self, net: nn.Module, blocks: list[Block], kept: torch.Tensor) -> None:
        tied = self.head is None
        with torch.no_grad():
            weight = self.embed.weight.detach().index_select(1, kept.to(self.embed.weight.device))
            self.embed.weight = nn.Parameter(weight.clone())
            self.embed.embedding_dim = int(weight.shape[1])
            for norm in (*(m for norms in self.layer_norms for m in norms), *self.final_norms):
                w = cast(Any, norm).weight
                cast(Any, norm).weight = nn.Parameter(
                    w.detach().index_select(0, kept.to(w.device)).clone()
                )
                if isinstance(getattr(norm, "bias", None), torch.Tensor):
                    b = cast(Any, norm).bias
                    cast(Any, norm).bias = nn.Parameter(
                        b.detach().index_select(0, kept.to(b.device)).clone()
                    )
        for block in blocks:
            attn = block.attention
            assert attn is not None  # the layout's refusals stop hidden where heads cannot go
            for linear in (attn.q, attn.k, attn.v):
                slice_linear(linear, None, kept)
            slice_linear(attn.o, kept, None)
            for writer in block.mlp.writers:  # they read the hidden stream
                slice_linear(writer.module, None, kept, writer.transposed)
            reader = block.mlp.reader
            slice_linear(reader.module, kept, None, reader.transposed)
        head = cast(Any, net).get_output_embeddings()
        if tied:
            head.weight = self.embed.weight
            head.in_features = int(self.embed.weight.shape[1])
        else:
            slice_linear(head, None, kept)
