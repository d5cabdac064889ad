"""Width slicing of a causal LM in the Llama layout: the modules of each decoder layer that
``width`` narrows, and how MLP neurons, key/value groups (with their query heads) and hidden
channels are cut out of them in place.

Works on Llama, Mistral, Qwen2 and Qwen3 (``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``); other layouts are refused with ``InvalidSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from core.errors import InvalidSpec
from core.pruning.llm.calibrate import LayerInputs
from core.pruning.llm.layers import DecoderLayer, Linear


@dataclass(frozen=True)
class Block:
    """The Llama-layout modules of one decoder layer that width pruning slices."""

    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def block_of(layer: DecoderLayer) -> Block:
    attn = getattr(layer.module, "self_attn", None)
    mlp = getattr(layer.module, "mlp", None)
    found: dict[str, nn.Linear] = {}
    for owner, names in (
        (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (mlp, ("gate_proj", "up_proj", "down_proj")),
    ):
        for name in names:
            module = getattr(owner, name, None) if owner is not None else None
            if not isinstance(module, nn.Linear):
                raise InvalidSpec(
                    f"granularity 'width' needs the Llama layout (self_attn.q/k/v/o_proj and "
                    f"mlp.gate/up/down_proj as linear layers); {layer.name} has no {name} "
                    "(GPT-2 layouts are not supported yet: use 'depth', 'unstructured' or 'n:m')"
                )
            found[name] = module
    assert attn is not None
    return Block(
        attn,
        found["q_proj"],
        found["k_proj"],
        found["v_proj"],
        found["o_proj"],
        found["gate_proj"],
        found["up_proj"],
        found["down_proj"],
    )


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep only ``rows`` (outputs) and ``cols`` (inputs) of ``linear``, in place."""
    with torch.no_grad():
        weight = linear.weight.detach()
        if rows is not None:
            weight = weight.index_select(0, rows.to(weight.device))
            if linear.bias is not None:
                bias = linear.bias.detach().index_select(0, rows.to(weight.device))
                linear.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
        if cols is not None:
            weight = weight.index_select(1, cols.to(weight.device))
        linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = int(weight.shape[0]), int(weight.shape[1])


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
        slice_linear(block.gate, kept_mlp, None)
        slice_linear(block.up, kept_mlp, None)
        slice_linear(block.down, None, kept_mlp)
    if kept_kv is not None:
        d = heads.head_dim
        kv_rows = (kept_kv[:, None] * d + torch.arange(d)).reshape(-1)
        q_heads = (kept_kv[:, None] * heads.group + torch.arange(heads.group)).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
        slice_linear(block.q, q_rows, None)
        slice_linear(block.k, kv_rows, None)
        slice_linear(block.v, kv_rows, None)
        slice_linear(block.o, None, q_rows)
        for name, value in (
            ("num_heads", len(q_heads)),
            ("num_key_value_heads", len(kept_kv)),
        ):
            if hasattr(block.attn, name):
                setattr(block.attn, name, value)


def width_shape(
    linear: Linear, layer: DecoderLayer, mlp: int, q_out: int, kv_out: int, hidden: int
) -> tuple[int, int]:
    out, inp = linear.shape
    short = linear.name[len(layer.name) + 1 :].rsplit(".", 1)[-1]
    if short in ("gate_proj", "up_proj"):
        return (mlp, hidden)
    if short == "down_proj":
        return (hidden, mlp)
    if short == "q_proj":
        return (q_out, hidden)
    if short in ("k_proj", "v_proj"):
        return (kv_out, hidden)
    if short == "o_proj":
        return (hidden, q_out)
    return (out, inp)


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

    def outside_per_channel(self) -> int:
        """Parameters per hidden channel outside the decoder layers."""
        vocab = int(self.embed.weight.shape[0])
        head = int(self.head.weight.shape[0]) if self.head is not None else 0
        return vocab + head + len(self.final_norms)

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
            for linear in (block.q, block.k, block.v, block.gate, block.up):
                slice_linear(linear, None, kept)
            slice_linear(block.o, kept, None)
            slice_linear(block.down, kept, None)
        head = cast(Any, net).get_output_embeddings()
        if tied:
            head.weight = self.embed.weight
            head.in_features = int(self.embed.weight.shape[1])
        else:
            slice_linear(head, None, kept)
