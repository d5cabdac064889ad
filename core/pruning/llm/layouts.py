"""Decoder-layer layouts that ``width`` knows how to narrow, registered by name.

A layout finds, in one decoder layer, the modules that carry MLP neurons (:class:`Mlp`) and,
where heads can be removed, the attention projections (:class:`Attention`); it names the config
keys the new sizes are written to, and the width parts it cannot remove with the reason. Two are
registered here:

* ``llama`` (Llama, Mistral, Qwen2, Qwen3): ``self_attn.{q,k,v,o}_proj`` and
  ``mlp.{gate,up,down}_proj``; MLP neurons, key/value groups and hidden channels;
* ``gpt2``: ``mlp.c_fc`` / ``mlp.c_proj`` (``Conv1D``, weights stored ``(in, out)``); MLP
  neurons only (``n_inner``).

Another architecture is one more :func:`register_layout` call, not a branch in the pruner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn

from core.errors import InvalidSpec
from core.pruning.llm.layers import DecoderLayer, Linear
from core.spec import WidthSpec


def slice_linear(
    linear: nn.Module,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    transposed: bool = False,
) -> None:
    """Keep only ``rows`` (outputs) and ``cols`` (inputs) of ``linear``, in place;
    ``transposed``: the weight is stored ``(in, out)``, as in GPT-2's ``Conv1D``."""
    module = cast(Any, linear)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    with torch.no_grad():
        weight = module.weight.detach()
        if rows is not None:
            weight = weight.index_select(out_dim, rows.to(weight.device))
            if module.bias is not None:
                bias = module.bias.detach().index_select(0, rows.to(weight.device))
                module.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
        if cols is not None:
            weight = weight.index_select(in_dim, cols.to(weight.device))
        module.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    out, inp = int(weight.shape[out_dim]), int(weight.shape[in_dim])
    if transposed:
        module.nf, module.nx = out, inp
    else:
        module.out_features, module.in_features = out, inp


def _has_bias(linear: Linear) -> int:
    return int(getattr(linear.module, "bias", None) is not None)


@dataclass(frozen=True)
class Mlp:
    """The neurons of one MLP: each ``writer`` has one output per neuron, the ``reader`` one
    input per neuron; the reader's input is the neurons' activation."""

    writers: tuple[Linear, ...]
    reader: Linear

    @property
    def neurons(self) -> int:
        return self.reader.shape[1]

    def magnitude(self) -> torch.Tensor:
        """Each neuron's weight norm over every matrix it appears in."""
        total = self.reader.matrix(torch.float64).square().sum(0)
        for writer in self.writers:
            total += writer.matrix(torch.float64).square().sum(1)
        return total.sqrt().cpu()

    def keep(self, kept: torch.Tensor) -> None:
        for writer in self.writers:
            slice_linear(writer.module, kept, None, writer.transposed)
        slice_linear(self.reader.module, None, kept, self.reader.transposed)

    def shapes(self, neurons: int, hidden: int) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of each matrix at ``neurons`` neurons and ``hidden`` channels."""
        return {
            **{w.name: (neurons, hidden) for w in self.writers},
            self.reader.name: (hidden, neurons),
        }

    def bias_per_neuron(self) -> int:
        return sum(_has_bias(w) for w in self.writers)


@dataclass(frozen=True)
class Attention:
    """Separate query/key/value/output projections (``nn.Linear``) of one attention module."""

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass(frozen=True)
class Sizes:
    """The per-layer sizes after width pruning."""

    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Block:
    """What width slices in one decoder layer: its MLP and, where heads can go, its attention."""

    mlp: Mlp
    attention: Attention | None
    names: Mapping[int, str]  # id(module) -> its path, for the projections above

    def shapes(self, sizes: Sizes) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of every projection this block slices, at ``sizes``."""
        shapes = self.mlp.shapes(sizes.mlp, sizes.hidden)
        if self.attention is not None:
            a, q_out = self.attention, sizes.heads * sizes.head_dim
            kv_out = sizes.kv_heads * sizes.head_dim
            shapes[self.names[id(a.q)]] = (q_out, sizes.hidden)
            shapes[self.names[id(a.k)]] = (kv_out, sizes.hidden)
            shapes[self.names[id(a.v)]] = (kv_out, sizes.hidden)
            shapes[self.names[id(a.o)]] = (sizes.hidden, q_out)
        return shapes


class Layout(Protocol):
    """One decoder-layer layout (see the module docs)."""

    name: ClassVar[str]
    # Module paths inside a decoder layer (``mlp.c_fc``) that every layer of the layout has.
    paths: ClassVar[frozenset[str]]
    # Width parts (``mlp``, ``heads``, ``hidden``) this layout cannot remove -> why.
    refusals: ClassVar[Mapping[str, str]]

    def block(self, layer: DecoderLayer) -> Block | None:
        """The layer's parts, or ``None`` if the layer is not in this layout."""
        ...

    def config_sizes(self, sizes: Sizes) -> dict[str, int]:
        """The config keys and values that describe ``sizes``."""
        ...


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


def layout_of(layers: tuple[DecoderLayer, ...]) -> tuple[Layout, list[Block]]:
    """The first registered layout every decoder layer matches, with each layer's parts."""
    for layout in LAYOUTS.values():
        blocks = [layout.block(layer) for layer in layers]
        if all(block is not None for block in blocks):
            return layout, [block for block in blocks if block is not None]
    raise InvalidSpec(
        f"granularity 'width' supports the layouts {sorted(LAYOUTS)} (Llama: self_attn.q/k/v/"
        "o_proj and mlp.gate/up/down_proj; GPT-2: mlp.c_fc/c_proj); "
        f"{layers[0].name} is in none of them: use 'depth', 'unstructured' or 'n:m'"
    )


def layout_named(paths: Iterable[str]) -> Layout | None:
    """The first registered layout whose module paths (inside one decoder layer) are all among
    ``paths``: what a preflight can tell from layer names alone."""
    present = set(paths)
    return next((x for x in LAYOUTS.values() if x.paths <= present), None)


def refuse_parts(layout: Layout, width: WidthSpec) -> None:
    """``InvalidSpec`` when ``width`` removes a part ``layout`` cannot remove."""
    for part, fraction in width.model_dump().items():
        if fraction > 0 and part in layout.refusals:
            raise InvalidSpec(f"width.{part} cannot be pruned here: {layout.refusals[part]}")


def _by_path(layer: DecoderLayer) -> dict[str, Linear]:
    return {lin.name[len(layer.name) + 1 :]: lin for lin in layer.linears}


class LlamaLayout:
    name: ClassVar[str] = "llama"
    _attention = tuple(f"self_attn.{p}_proj" for p in "qkvo")
    paths: ClassVar[frozenset[str]] = frozenset(
        (*_attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    refusals: ClassVar[Mapping[str, str]] = {}

    def block(self, layer: DecoderLayer) -> Block | None:
        found = _by_path(layer)
        paths = [*self._attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        if not all(p in found and not found[p].transposed for p in paths):
            return None
        q, k, v, o = (cast(nn.Linear, found[p].module) for p in paths[:4])
        attention = Attention(layer.module.get_submodule("self_attn"), q, k, v, o)
        mlp = Mlp((found["mlp.gate_proj"], found["mlp.up_proj"]), found["mlp.down_proj"])
        names = {id(found[p].module): found[p].name for p in paths}
        return Block(mlp, attention, names)

    def config_sizes(self, sizes: Sizes) -> dict[str, int]:
        return {
            "hidden_size": sizes.hidden,
            "intermediate_size": sizes.mlp,
            "num_attention_heads": sizes.heads,
            "num_key_value_heads": sizes.kv_heads,
            "head_dim": sizes.head_dim,
        }


class Gpt2Layout:
    name: ClassVar[str] = "gpt2"
    paths: ClassVar[frozenset[str]] = frozenset({"mlp.c_fc", "mlp.c_proj"})
    refusals: ClassVar[Mapping[str, str]] = {
        "heads": "GPT-2 splits n_embd into n_head heads of n_embd / n_head channels each, so a "
        "GPT-2 with fewer heads of the same size has no GPT2Config that stock transformers "
        "loads; remove MLP neurons ('mlp') or whole layers ('depth') instead",
        "hidden": "GPT-2's head size is n_embd / n_head, so narrowing n_embd would also change "
        "every head; remove MLP neurons ('mlp') or whole layers ('depth') instead",
    }

    def block(self, layer: DecoderLayer) -> Block | None:
        found = _by_path(layer)
        fc, proj = found.get("mlp.c_fc"), found.get("mlp.c_proj")
        if fc is None or proj is None:
            return None
        return Block(Mlp((fc,), proj), None, {id(fc.module): fc.name, id(proj.module): proj.name})

    def config_sizes(self, sizes: Sizes) -> dict[str, int]:
        return {"n_inner": sizes.mlp}


register_layout(LlamaLayout())
register_layout(Gpt2Layout())
