"""Scan units of language models at ``width`` (``hf``): the width *kinds*, not layers.

A stock config states one ``intermediate_size`` and one head count for every decoder layer, so
``pruning.width`` is one fraction per kind, the same in every layer; the search chooses those
fractions. Its units are the kinds the model's layout can remove and the user did not fix:
``mlp`` (MLP neurons), ``heads`` (key/value groups with their query heads) and ``hidden``
(channels of the residual stream). A cell prunes a copy of the model with one kind at a grid
ratio (plus the kinds the user fixed), with the job's own pruner and criterion, and scores it by
perplexity on the search text; the copy is then dropped (width slicing reshapes modules and the
config, so a copy is simpler and safer than putting them back). The copy lives beside the model
on the scan's device while a cell is scored.

The cost model is exact: every parameter the slicing shrinks, and every matmul it makes
cheaper, is described by its shape and the entries one removed neuron, group or channel takes
from each dimension; attention's two matmuls cost ``2 x heads x head_dim x T`` MACs per token
and layer (``T``: the measured forward's length); what no kind touches is the dense model's
measured MACs per token (and counted parameters) less the modelled part.

Example (no service needed)::

    spec = JobSpec.model_validate({"pruning": {"criterion": "magnitude",
        "granularity": "width", "target": {"macs": 0.7}}, ...})
    scanner = open_scanner(spec, "llama.tar", "wiki.txt")
    [u.key for u in scanner.units()]            # ['mlp', 'heads', 'hidden']
    scanner.cost_model().fraction("macs", {"mlp": 0.5})
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, replace
from typing import Any, ClassVar, cast

import torch
from torch import nn

from core.allocation import removal_count
from core.errors import InvalidSpec
from core.formats.base import ModelInfo
from core.formats.hf.measure import prefill_macs, prefill_tokens
from core.formats.hf.model import count_parameters
from core.pruning.base import PruneContext
from core.pruning.llm.layers import Linear, decoder_layers, unwrap
from core.pruning.llm.layouts import Block, Layout, Sizes, layout_of
from core.pruning.llm.llm_config import check_config_sizes
from core.pruning.llm.structure import StructurePruner
from core.pruning.llm.width import Heads, Hidden, head_layout
from core.search.cost import CostModel, TensorCost
from core.search.units import ScanUnit, UnitFamily
from core.spec import PruningSpec, WidthSpec

KINDS = ("mlp", "heads", "hidden")


def fixed_fractions(spec: PruningSpec) -> dict[str, float]:
    """The width kinds the user gave beside the target, at the fractions given: not searched."""
    if spec.width is None:
        return {}
    return {
        kind: getattr(spec.width, kind) for kind in KINDS if kind in spec.width.model_fields_set
    }


def width_with_ratios(spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
    """``spec`` with the chosen fractions (kind -> fraction) and the user's fixed ones in
    ``width``, every other kind at 0, and no target: the spec the width pruner runs."""
    width = WidthSpec(**{**dict.fromkeys(KINDS, 0.0), **ratios, **fixed_fractions(spec)})
    return spec.model_copy(update={"width": width, "sparsity": 0.0, "target": None, "search": None})


@dataclass
class Builds:
    """Whether the config class takes the sizes some removals give (the check the pruner makes
    before it changes anything; transformers' Llama wants ``hidden_size`` a multiple of the
    head count), remembered per size. ``removed``: items per kind, as :class:`WidthCost`
    counts them (hidden channels in steps of ``quantum``). Holds the config, not the model."""

    config: Any
    layout: Layout
    dense: Sizes
    group: int
    quantum: int = 1
    _seen: dict[tuple[int, ...], bool] = field(default_factory=dict)

    def __call__(self, removed: Mapping[str, float]) -> bool:
        d = self.dense
        kv = d.kv_heads - int(removed.get("heads", 0))
        new = Sizes(
            hidden=d.hidden - int(removed.get("hidden", 0)) * self.quantum,
            mlp=d.mlp - int(removed.get("mlp", 0)),
            heads=kv * self.group,
            kv_heads=kv,
            head_dim=d.head_dim,
        )
        key = astuple(new)
        if key not in self._seen:
            try:
                check_config_sizes(self.config, **self.layout.config_sizes(new))
                self._seen[key] = True
            except InvalidSpec:
                self._seen[key] = False
        return self._seen[key]


@dataclass(frozen=True)
class _Parts:
    """Where the width kinds are in one model: its layout, each layer's parts, the head layout
    and the hidden stream (None where the layout cannot remove that kind), and the items each
    kind has: neurons, key/value groups, hidden channels in steps of ``builds.quantum``."""

    net: nn.Module
    blocks: list[Block]
    heads: Heads | None
    hidden: Hidden | None
    builds: Builds

    @classmethod
    def of(cls, model: Any, spec: PruningSpec) -> _Parts:
        net = unwrap(model)
        layers = decoder_layers(net)
        layout, blocks = layout_of(layers)
        has_attention = all(b.attention is not None for b in blocks)
        heads = head_layout(net) if has_attention and "heads" not in layout.refusals else None
        hidden = Hidden.of(net, layers) if "hidden" not in layout.refusals else None
        seen = heads or Heads(1, 1, 0)
        dense = Sizes(
            hidden=hidden.size if hidden is not None else 0,
            mlp=blocks[0].mlp.neurons,
            heads=seen.heads,
            kv_heads=seen.kv_heads,
            head_dim=seen.head_dim,
        )
        builds = Builds(copy.deepcopy(cast(Any, net).config), layout, dense, seen.group)
        parts = cls(net, blocks, heads, hidden, builds)
        fixed = fixed_fractions(spec)
        if hidden is not None and "hidden" not in fixed:
            # Hidden channels go in steps the config takes beside the user's fixed kinds: one,
            # else as many as there are heads left.
            items = parts.fixed_items(fixed)
            left = (seen.kv_heads - items.get("heads", 0)) * seen.group
            for quantum in (1, left):
                if quantum and hidden.size % quantum == 0:
                    builds.quantum = quantum
                    if builds({**items, "hidden": 1}):
                        break
            else:
                builds.quantum = 0  # no step builds: hidden is not searched
        return parts

    @property
    def sizes(self) -> dict[str, int]:
        """Items of each kind this model can lose (hidden: none where no step builds)."""
        sizes = {"mlp": self.blocks[0].mlp.neurons}
        if self.heads is not None:
            sizes["heads"] = self.heads.kv_heads
        if self.hidden is not None and self.builds.quantum:
            sizes["hidden"] = self.hidden.size // self.builds.quantum
        return sizes

    def fixed_items(self, fixed: Mapping[str, float]) -> dict[str, int]:
        """Items the user's fixed fractions remove, as the pruner rounds them."""
        counts = {"mlp": self.builds.dense.mlp, "heads": self.builds.dense.kv_heads}
        counts["hidden"] = self.builds.dense.hidden
        return {k: removal_count(f, counts[k]) for k, f in fixed.items() if k in counts}

    def layers(self, kind: str) -> tuple[str, ...]:
        """The linears a kind narrows, in model order (the sensitivity artifact lists them)."""
        names: list[str] = []
        for block in self.blocks:
            mlp = [lin.name for lin in (*block.mlp.writers, block.mlp.reader)]
            attention = [name for name in block.names.values() if name not in mlp]
            names += {"mlp": mlp, "heads": attention, "hidden": attention + mlp}[kind]
        return tuple(names)


class WidthKindUnits(UnitFamily):
    """``hf`` models at ``width``: a unit per width kind, one fraction in every decoder layer."""

    format: ClassVar[str] = "hf"
    granularities: ClassVar[frozenset[str]] = frozenset({"width"})

    def units(
        self, program: Any, info: ModelInfo, spec: PruningSpec, calibration: Any
    ) -> list[ScanUnit]:
        parts = _Parts.of(program, spec)
        fixed = fixed_fractions(spec)
        return [
            ScanUnit(kind, parts.layers(kind), size)
            for kind, size in parts.sizes.items()
            if kind not in fixed and size > 1  # one item must stay: a kind of one has no choice
        ]

    def prune_one(
        self,
        program: Any,
        info: ModelInfo,
        spec: PruningSpec,
        unit: ScanUnit,
        ratio: float,
        calibration: Any,
    ) -> Any:
        """A pruned copy of the network: ``unit``'s kind at ``ratio``, the user's fixed kinds
        at theirs."""
        fractions = _buildable(_Parts.of(program, spec), spec, {unit: ratio})
        return self._pruned_copy(program, info, spec, fractions, calibration)

    @contextmanager
    def applied(
        self,
        model: Any,
        info: ModelInfo,
        spec: PruningSpec,
        ratios: Mapping[ScanUnit, float],
        calibration: Any,
    ) -> Iterator[nn.Module]:
        """A pruned copy with every kind of ``ratios`` (and the fixed ones) at once; the model
        itself when nothing is pruned."""
        fractions = _buildable(_Parts.of(model, spec), spec, ratios)
        if not any(fractions.values()) and not any(fixed_fractions(spec).values()):
            yield unwrap(model)
            return
        yield self._pruned_copy(model, info, spec, fractions, calibration)

    def with_ratios(self, spec: PruningSpec, ratios: Mapping[str, float]) -> PruningSpec:
        return width_with_ratios(spec, ratios)

    def check(self, spec: PruningSpec) -> None:
        """Beside the grid: a target needs a kind left to choose. With every kind given in
        ``pruning.width`` there is nothing to search (a model whose layout cannot remove the
        kinds left is found out at load: the worker's "no layer is left")."""
        super().check(spec)
        fixed = fixed_fractions(spec)
        if set(fixed) >= set(KINDS):
            given = ", ".join(f"{k}: {fixed[k]:g}" for k in KINDS)
            raise InvalidSpec(
                f"'pruning.width' fixes every width kind ({given}), so the target has nothing "
                "left to search; leave out the kinds the search should choose, or drop "
                "'target' and prune at these fractions",
                "pruning.width",
            )

    def cost_model(
        self, program: Any, info: ModelInfo, spec: PruningSpec, units: list[ScanUnit]
    ) -> CostModel:
        parts = _Parts.of(program, spec)
        net = parts.net
        context = getattr(getattr(info, "config", None), "max_position_embeddings", None)
        tokens = prefill_tokens(context)
        tensors = _tensors(parts, tokens)
        first = next(net.parameters())
        ids = torch.zeros((1, tokens), dtype=torch.long, device=first.device)
        was_training = net.training
        net.eval()
        try:
            dense_macs = prefill_macs(net, ids)
        finally:
            net.train(was_training)
        modelled_macs = sum(t.macs_per_entry * t.entries({}) for t in tensors.values())
        modelled_params = sum(t.entries({}) for t in tensors.values() if t.parameter)
        return WidthCost(
            tensors=tensors,
            # A fixed kind is counted on the same items (hidden: channels, as it is not stepped).
            sizes=parts.sizes,
            fixed_macs=dense_macs - modelled_macs,
            fixed_params=count_parameters(net) - modelled_params,
            fixed=fixed_fractions(spec),
            builds=parts.builds,
        )

    def _pruned_copy(
        self,
        model: Any,
        info: ModelInfo,
        spec: PruningSpec,
        fractions: Mapping[str, float],
        calibration: Any,
    ) -> nn.Module:
        net = copy.deepcopy(unwrap(model))
        pruning = width_with_ratios(spec, fractions)
        StructurePruner().prune(net, info, pruning, PruneContext(calibration=calibration))
        return net


def _buildable(
    parts: _Parts, spec: PruningSpec, ratios: Mapping[ScanUnit, float]
) -> dict[str, float]:
    """The fractions a cell prunes: each unit's ratio on its items, one item always left, and
    fewer where the config would refuse the sizes beside the user's fixed kinds (a cell is
    scored on a model the pruner can build)."""
    fixed = parts.fixed_items(fixed_fractions(spec))
    items: dict[str, int] = {}
    for unit, ratio in ratios.items():
        k = min(removal_count(ratio, unit.size), unit.size - 1)
        while k > 0 and not parts.builds({**fixed, **items, unit.key: k}):
            k -= 1
        items[unit.key] = k
    return {key: k / parts.sizes[key] for key, k in items.items()}


@dataclass(frozen=True)
class WidthCost(CostModel):
    """The cost model with the user's fixed kinds (``fixed``: kind -> fraction) always
    removed; fractions are still of the dense model. ``builds`` says which sizes the config
    takes: the allocation never goes through others."""

    fixed: dict[str, float] = field(default_factory=dict)
    builds: Builds | None = None

    def removed(self, ratios: Mapping[str, float]) -> dict[str, float]:
        return super().removed({**ratios, **self.fixed})

    def allows(self, ratios: Mapping[str, float]) -> bool:
        return self.builds is None or self.builds(self.removed(ratios))

    def fraction(self, kind: str, ratios: Mapping[str, float]) -> float:
        measure = self.macs if kind == "macs" else self.params
        dense = self._dense_macs if kind == "macs" else self._dense_params
        return measure(ratios) / dense if dense else 1.0

    @functools.cached_property
    def _dense(self) -> CostModel:
        return replace(self, fixed={})

    @functools.cached_property
    def _dense_macs(self) -> float:
        return self._dense.macs({})

    @functools.cached_property
    def _dense_params(self) -> float:
        return self._dense.params({})


def _tensors(parts: _Parts, tokens: int) -> dict[str, TensorCost]:
    """Every tensor (and attention's matmuls) a width kind shrinks, by name."""
    tensors: dict[str, TensorCost] = {}

    def linear(
        lin: Linear | nn.Module, name: str, out: dict[str, float], inp: dict[str, float]
    ) -> None:
        module = lin.module if isinstance(lin, Linear) else lin
        transposed = isinstance(lin, Linear) and lin.transposed
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        tensors[f"{name}.weight"] = TensorCost(
            tuple(weight.shape), 1.0, True, {out_dim: out, in_dim: inp}
        )
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors[f"{name}.bias"] = TensorCost(tuple(bias.shape), 0.0, True, {0: out})

    quantum = float(parts.builds.quantum)
    hidden = {"hidden": quantum} if parts.hidden is not None else {}
    for index, block in enumerate(parts.blocks):
        for writer in block.mlp.writers:
            linear(writer, writer.name, {"mlp": 1.0}, hidden)
        reader = block.mlp.reader
        linear(reader, reader.name, hidden, {"mlp": 1.0})
        heads, attention = parts.heads, block.attention
        if heads is None or attention is None:
            continue  # attention is not narrowed: its cost is in the fixed part
        d, group = heads.head_dim, heads.group
        q = {"heads": float(group * d)}
        kv = {"heads": float(d)}
        linear(attention.q, block.names[id(attention.q)], q, hidden)
        linear(attention.k, block.names[id(attention.k)], kv, hidden)
        linear(attention.v, block.names[id(attention.v)], kv, hidden)
        linear(attention.o, block.names[id(attention.o)], hidden, q)
        # Scores (q . k) and their weighted sum of v: heads x head_dim x T MACs each per token.
        tensors[f"attention.{index}"] = TensorCost((heads.heads * d,), 2.0 * tokens, False, {0: q})
    if parts.hidden is not None:
        h = parts.hidden
        per_channel = {1: hidden}
        tensors["embed"] = TensorCost(tuple(h.embed.weight.shape), 0.0, True, per_channel)
        head = h.head if h.head is not None else h.embed  # tied: the same matrix, read again
        tensors["lm_head"] = TensorCost(
            tuple(head.weight.shape), 1.0, h.head is not None, per_channel
        )
        norms = (*(m for norms in h.layer_norms for m in norms), *h.final_norms)
        for i, norm in enumerate(norms):
            for what in ("weight", "bias"):
                t = getattr(norm, what, None)
                if isinstance(t, torch.Tensor):
                    tensors[f"norm.{i}.{what}"] = TensorCost(tuple(t.shape), 0.0, True, {0: hidden})
    return tensors
