"""The ``hf`` pruner at ``width`` and ``depth``: a causal LM that physically gets smaller.

``width`` removes the same number of units from every decoder layer, so the result stays a stock
checkpoint (one ``intermediate_size`` and one head count for all layers):

* ``mlp``: neurons -- rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``;
* ``heads``: whole key/value groups with their query heads -- rows of ``q/k/v_proj`` (and their
  biases) and columns of ``o_proj``; ``head_dim`` is written explicitly into the config;
* ``hidden``: channels of the residual stream -- columns of the embedding, the output head and
  every projection reading it, rows of every projection writing it, entries of every norm on
  it (tied embeddings stay tied).

Units are chosen per layer (lowest scores go) by ``activation`` (calibrated layer by layer on the
already narrowed layers before), ``magnitude`` (the unit's weights' norm) or ``random``
(``seed``). Sizes the config class refuses (transformers wants ``hidden_size`` a multiple of
``num_attention_heads``) are refused with ``InvalidSpec`` before anything changes. Width works on
the Llama layout (Llama, Mistral, Qwen2, Qwen3: ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``); GPT-2 is refused.

``depth`` removes the ``k`` decoder layers whose removal changes the hidden states least:
``activation`` scores a layer ``1 - cos(input, output)`` averaged over the calibration tokens
(one pass through the dense model, layer by layer); ``random`` ranks them at random (``seed``).
The kept layers are renumbered (``layer_idx`` of every submodule that has one, for the KV cache),
and ``num_hidden_layers`` and per-layer config lists (``layer_types``) are rewritten.

Reported per prunable linear of the *original* model (``PruneOutcome.layers``): a linear whose
decoder layer was removed has ``shape_after == (0, 0)`` and no parameters; ``details["renamed"]``
maps the old module path of every kept, renumbered decoder layer to its new one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from core.allocation import removal_count
from core.errors import InvalidSpec, PruningError
from core.formats.base import ModelInfo
from core.metrics import sparse_size_bytes
from core.pruning.base import LayerResult, PruneContext, PruneOutcome
from core.pruning.llm.calibrate import LayerInputs, calibration_ids, capture_inputs
from core.pruning.llm.layers import DecoderLayer, Linear, decoder_layers, prunable_linears, unwrap
from core.pruning.llm.sequential import CALIBRATION_MEMORY, calibration_batch
from core.spec import PruningSpec

WIDTH_CRITERIA = frozenset({"activation", "magnitude", "random", "taylor"})
DEPTH_CRITERIA = frozenset({"activation", "random", "taylor"})
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Config lists with one entry per decoder layer, cut to the kept layers by depth pruning.
_PER_LAYER_LISTS = frozenset({"layer_types", "no_rope_layers"})

Scores = torch.Tensor  # one score per unit; the lowest go first


@dataclass(frozen=True)
class _Block:
    """The Llama-layout modules of one decoder layer that width pruning slices."""

    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def _block(layer: DecoderLayer) -> _Block:
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
    return _Block(
        attn,
        found["q_proj"],
        found["k_proj"],
        found["v_proj"],
        found["o_proj"],
        found["gate_proj"],
        found["up_proj"],
        found["down_proj"],
    )


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
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


def _lowest(scores: Scores, removals: int) -> torch.Tensor:
    """The kept indices, ascending: all but the ``removals`` lowest scores (ties: lower index
    goes first)."""
    order = torch.argsort(scores.float().cpu(), stable=True)
    return order[removals:].sort().values


def _random_scores(count: int, generator: torch.Generator) -> Scores:
    return torch.rand(count, generator=generator)


class _AbsSum:
    """Forward pre-hook summing |x| per input feature over every token."""

    def __init__(self, features: int) -> None:
        self.total = torch.zeros(features, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        self.total += x.abs().sum(0, dtype=torch.float64).cpu()


class _SqSum:
    """Forward pre-hook summing x^2 per input feature over every token."""

    def __init__(self, features: int) -> None:
        self.total = torch.zeros(features, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.total += x.square().sum(0).cpu()


@dataclass(frozen=True)
class _Heads:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _head_layout(net: nn.Module) -> _Heads:
    config: Any = net.config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return _Heads(heads, kv, int(head_dim))


def _width_scores(
    criterion: str,
    block: _Block,
    heads: _Heads,
    stats: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator,
) -> tuple[Scores, Scores]:
    """(per MLP neuron, per key/value group) scores of one layer."""
    neurons = block.down.in_features
    if criterion == "random":
        return _random_scores(neurons, generator), _random_scores(heads.kv_heads, generator)
    if criterion == "magnitude":
        with torch.no_grad():
            mlp = (
                block.gate.weight.double().square().sum(1)
                + block.up.weight.double().square().sum(1)
                + block.down.weight.double().square().sum(0)
            ).sqrt()
            per_head = block.q.weight.double().square().sum(1).reshape(heads.heads, -1).sum(
                1
            ) + block.o.weight.double().square().sum(0).reshape(heads.heads, -1).sum(1)
            per_kv = block.k.weight.double().square().sum(1).reshape(heads.kv_heads, -1).sum(
                1
            ) + block.v.weight.double().square().sum(1).reshape(heads.kv_heads, -1).sum(1)
            groups = (per_head.reshape(heads.kv_heads, heads.group).sum(1) + per_kv).sqrt()
        return mlp.cpu(), groups.cpu()
    assert stats is not None
    # activation: mean |x| of the down_proj input per neuron; per head the L2 norm of its slice
    # of the o_proj input over every token, summed over the heads of each key/value group.
    per_head = stats["o"].reshape(heads.heads, heads.head_dim).sum(1).sqrt()
    return stats["down"], per_head.reshape(heads.kv_heads, heads.group).sum(1)


def _prune_width_layer(
    block: _Block, heads: _Heads, kept_mlp: torch.Tensor | None, kept_kv: torch.Tensor | None
) -> None:
    if kept_mlp is not None:
        _slice_linear(block.gate, kept_mlp, None)
        _slice_linear(block.up, kept_mlp, None)
        _slice_linear(block.down, None, kept_mlp)
    if kept_kv is not None:
        d = heads.head_dim
        kv_rows = (kept_kv[:, None] * d + torch.arange(d)).reshape(-1)
        q_heads = (kept_kv[:, None] * heads.group + torch.arange(heads.group)).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
        _slice_linear(block.q, q_rows, None)
        _slice_linear(block.k, kv_rows, None)
        _slice_linear(block.v, kv_rows, None)
        _slice_linear(block.o, None, q_rows)
        for name, value in (
            ("num_heads", len(q_heads)),
            ("num_key_value_heads", len(kept_kv)),
        ):
            if hasattr(block.attn, name):
                setattr(block.attn, name, value)


def _removals(fraction: float, count: int) -> int:
    """round(fraction x count), halves up, as every pruner counts."""
    return removal_count(fraction, count)


def _is_norm(module: nn.Module, size: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        "norm" in type(module).__name__.lower()
        and isinstance(weight, torch.Tensor)
        and weight.shape == (size,)
    )


@dataclass(frozen=True)
class _Hidden:
    """Everything that carries the hidden (residual) dimension: the input embedding, the norms
    on the residual stream (those of each decoder layer outside its attention and MLP, and the
    final one), the projections' hidden side and the output embedding (tied or not)."""

    size: int
    embed: nn.Embedding
    head: nn.Linear | None  # None when tied to ``embed``
    layer_norms: tuple[tuple[nn.Module, ...], ...]
    final_norms: tuple[nn.Module, ...]

    @classmethod
    def of(cls, net: nn.Module, layers: tuple[DecoderLayer, ...]) -> _Hidden:
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
                if name not in ("self_attn", "mlp") and _is_norm(m, size)
            )
            for layer in layers
        )
        final = tuple(m for m in net.modules() if id(m) not in inside and _is_norm(m, size))
        tied = head.weight is embed.weight
        return cls(size, embed, None if tied else head, per_layer, final)

    def outside_per_channel(self) -> int:
        """Parameters per hidden channel outside the decoder layers."""
        vocab = int(self.embed.weight.shape[0])
        head = int(self.head.weight.shape[0]) if self.head is not None else 0
        return vocab + head + len(self.final_norms)

    def magnitude(self) -> Scores:
        """Each channel's input-embedding column norm (what every token writes into it)."""
        return self.embed.weight.detach().double().square().sum(0).sqrt().cpu()

    @torch.no_grad()
    def activation(
        self, net: nn.Module, layers: tuple[DecoderLayer, ...], inputs: LayerInputs
    ) -> Scores:
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

    def prune(self, net: nn.Module, blocks: list[_Block], kept: torch.Tensor) -> None:
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
                _slice_linear(linear, None, kept)
            _slice_linear(block.o, kept, None)
            _slice_linear(block.down, kept, None)
        head = cast(Any, net).get_output_embeddings()
        if tied:
            head.weight = self.embed.weight
            head.in_features = int(self.embed.weight.shape[1])
        else:
            _slice_linear(head, None, kept)


class StructurePruner:
    """Makes a causal LM narrower (``width``) or shallower (``depth``); see the module docs.

    One shot only: an iterative schedule is refused in :meth:`preflight`. A dry run changes no
    weight: it reports the sizes and the parameter count the spec leads to; for ``depth`` it
    also names the layers that would go (``random``, or ``activation`` given calibration data:
    one forward pass). Which width units go depends on the layers pruned before, so a width dry
    run names none.
    """

    format: ClassVar[str] = "hf"
    granularities: ClassVar[frozenset[str]] = frozenset({"width", "depth"})

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    # -- checks ----------------------------------------------------------------------------

    def preflight(self, spec: PruningSpec, layers: Mapping[str, int]) -> None:
        allowed = WIDTH_CRITERIA if spec.granularity == "width" else DEPTH_CRITERIA
        if spec.criterion not in allowed:
            raise InvalidSpec(
                f"criterion {spec.criterion!r} is not available for {spec.granularity!r} on 'hf' "
                f"models yet; use one of: {', '.join(sorted(allowed))}"
            )
        if spec.schedule.kind != "one_shot":
            raise InvalidSpec(
                f"granularity {spec.granularity!r} prunes in one shot; use schedule "
                "{'kind': 'one_shot'} (fine-tuning afterwards still applies)"
            )
        if spec.exclude or spec.layer_sparsity or spec.scope != "layer":
            raise InvalidSpec(
                f"granularity {spec.granularity!r} removes the same units from every decoder "
                "layer; exclude, layer_sparsity and scope 'global' do not apply"
            )
        if spec.depth is not None and layers:
            count = len({m.group(1) for name in layers if (m := _LAYER_INDEX.search(name))})
            if count and spec.depth.layers >= count:
                raise InvalidSpec(
                    f"depth.layers is {spec.depth.layers} but the model has {count} decoder "
                    "layers; at least one must stay"
                )

    def round_spec(self, spec: PruningSpec, before: float, after: float) -> PruningSpec:
        # preflight refuses iterative schedules: the one round is the whole spec.
        return spec

    def hold_zeros(self, model: Any, info: ModelInfo) -> Callable[[Any], None]:
        # Removed units are gone from the model: nothing is held at zero.
        def restore(retrained: Any) -> None:
            return None

        return restore

    # -- pruning ---------------------------------------------------------------------------

    def prune(
        self, model: Any, info: ModelInfo, spec: PruningSpec, ctx: PruneContext
    ) -> PruneOutcome:
        net = unwrap(model)
        layers = decoder_layers(net)
        linears = prunable_linears(net)
        names = [layer.name for layer in info.prunable_layers] or list(linears)
        missing = [name for name in names if name not in linears]
        if missing:
            raise PruningError(f"prunable layers {missing[:5]} are not in the model")
        self.preflight(spec, {name: linears[name].weight.numel() for name in names})
        owner = {lin.name: layer.name for layer in layers for lin in layer.linears}
        before = {name: _before_shape(info, name, linears[name]) for name in names}
        details: dict[str, Any] = {"criterion": spec.criterion}
        input_ids = None if ctx.dry_run and not ctx.calibration else calibration_ids(spec, ctx)
        if input_ids is not None:
            details["calibration"] = {
                "num_samples": int(input_ids.shape[0]),
                "seq_len": int(input_ids.shape[1]),
            }
        shapes: dict[str, tuple[int, int]]
        removed: set[str] = set()
        if spec.granularity == "width":
            assert spec.width is not None
            shapes = self._width(net, layers, spec, input_ids, ctx.dry_run, details)
        else:
            assert spec.depth is not None
            removed = self._depth(net, layers, spec, input_ids, ctx.dry_run, details)
            shapes = {name: lin.shape for name, lin in linears.items()}
        kinds = {layer.name: layer.kind for layer in info.prunable_layers}
        results = []
        for name in names:
            linear = linears[name]
            gone = owner[name] in removed
            shape = (0, 0) if gone else shapes[name]
            params = 0 if gone else shape[0] * shape[1]
            nonzero = 0 if gone else (params if ctx.dry_run else int(linear.weight.count_nonzero()))
            results.append(
                LayerResult(
                    name=name,
                    kind=kinds.get(name, "linear"),
                    shape_before=before[name],
                    shape_after=shape,
                    params=params,
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / params if params else 1.0,
                )
            )
        parameters = dict(net.named_parameters())  # tied tensors once
        if ctx.dry_run:
            params_after = int(details["predicted_params_after"])
            nonzero_after = params_after
            size = 0
        else:
            params_after = sum(p.numel() for p in parameters.values())
            nonzero_after = sum(int(p.count_nonzero()) for p in parameters.values())
            live = {n for n in linears if owner[n] not in removed}
            size = sparse_size_bytes(
                {n: p.detach() for n, p in parameters.items()},
                (f"{_renamed(n, details.get('renamed', {}))}.weight" for n in sorted(live)),
            )
        return PruneOutcome(
            model=model,
            layers=tuple(results),
            params_after=params_after,
            nonzero_params_after=nonzero_after,
            sparse_size_bytes=size,
            details=details,
        )

    def _width(
        self,
        net: nn.Module,
        layers: tuple[DecoderLayer, ...],
        spec: PruningSpec,
        input_ids: torch.Tensor | None,
        dry_run: bool,
        details: dict[str, Any],
    ) -> dict[str, tuple[int, int]]:
        assert spec.width is not None
        blocks = [_block(layer) for layer in layers]
        heads = _head_layout(net)
        neurons = blocks[0].down.in_features
        drop_mlp = _removals(spec.width.mlp, neurons)
        drop_kv = _removals(spec.width.heads, heads.kv_heads)
        if drop_mlp >= neurons or drop_kv >= heads.kv_heads:
            raise InvalidSpec(
                f"width removes {drop_mlp} of {neurons} MLP neurons and {drop_kv} of "
                f"{heads.kv_heads} key/value groups per layer; at least one of each must stay"
            )
        hidden = _Hidden.of(net, layers)
        drop_hidden = _removals(spec.width.hidden, hidden.size)
        if drop_hidden >= hidden.size:
            raise InvalidSpec(f"width.hidden removes all {hidden.size} hidden channels")
        new_mlp = neurons - drop_mlp
        new_kv = heads.kv_heads - drop_kv
        new_heads = new_kv * heads.group
        new_hidden = hidden.size - drop_hidden
        _check_config(
            net,
            hidden_size=new_hidden,
            intermediate_size=new_mlp,
            num_attention_heads=new_heads,
            num_key_value_heads=new_kv,
            head_dim=heads.head_dim,
        )
        details["hidden_size"] = new_hidden
        details["intermediate_size"] = new_mlp
        details["num_key_value_heads"] = new_kv
        details["num_attention_heads"] = new_heads
        if dry_run:
            removed_params = sum(
                drop_mlp * (b.gate.in_features + b.up.in_features + b.down.out_features)
                + drop_kv
                * heads.head_dim
                * (
                    heads.group * (b.q.in_features + b.o.out_features)
                    + b.k.in_features
                    + b.v.in_features
                )
                + drop_mlp * int(b.gate.bias is not None) * 2
                + drop_kv * heads.head_dim * int(b.q.bias is not None) * (heads.group + 2)
                for b in blocks
            )
            q_out, kv_out = new_heads * heads.head_dim, new_kv * heads.head_dim
            per_layer = 2 * q_out + 2 * kv_out + 3 * new_mlp + len(hidden.layer_norms[0])
            per_layer += int(blocks[0].o.bias is not None) + int(blocks[0].down.bias is not None)
            removed_params += drop_hidden * (per_layer * len(layers) + hidden.outside_per_channel())
            details["predicted_params_after"] = _unique_params(net) - removed_params
            return {
                lin.name: _width_shape(lin, layer, new_mlp, q_out, kv_out, new_hidden)
                for layer in layers
                for lin in layer.linears
            }
        inputs = None
        taylor: _Taylor | None = None
        if spec.criterion == "activation":
            assert input_ids is not None
            inputs = self._capture(net, layers, input_ids)
        elif spec.criterion == "taylor":
            assert input_ids is not None
            taylor = self._taylor(net, layers, input_ids, blocks, hidden if drop_hidden else None)
        generator = torch.Generator().manual_seed(spec.seed)
        kept_mlp: dict[str, list[int]] = {}
        kept_kv: dict[str, list[int]] = {}
        was_training = net.training
        net.eval()
        try:
            for index, (layer, block) in enumerate(zip(layers, blocks, strict=True)):
                stats = None
                if inputs is not None:
                    stats = _activation_stats(layer, block, inputs)
                mlp_scores, kv_scores = (
                    _width_scores(spec.criterion, block, heads, stats, generator)
                    if taylor is None
                    else (taylor.mlp[index], taylor.kv_groups(index, heads))
                )
                keep_mlp = _lowest(mlp_scores, drop_mlp) if drop_mlp else None
                keep_kv = _lowest(kv_scores, drop_kv) if drop_kv else None
                _prune_width_layer(block, heads, keep_mlp, keep_kv)
                kept_mlp[layer.name] = (
                    keep_mlp if keep_mlp is not None else torch.arange(neurons)
                ).tolist()
                kept_kv[layer.name] = (
                    keep_kv if keep_kv is not None else torch.arange(heads.kv_heads)
                ).tolist()
                if inputs is not None and index + 1 < len(layers):
                    inputs.advance(layer.module)  # the next layer sees this one pruned
            if drop_hidden:
                scores = (
                    taylor.hidden
                    if taylor is not None
                    else hidden.activation(net, layers, self._capture(net, layers, input_ids))
                    if input_ids is not None
                    else hidden.magnitude()
                    if spec.criterion == "magnitude"
                    else _random_scores(hidden.size, generator)
                )
                keep_hidden = _lowest(scores, drop_hidden)
                hidden.prune(net, blocks, keep_hidden)
                details["kept_hidden"] = keep_hidden.tolist()
        finally:
            net.train(was_training)
        config: Any = net.config
        config.hidden_size = new_hidden
        config.intermediate_size = new_mlp
        config.num_attention_heads = new_heads
        config.num_key_value_heads = new_kv
        config.head_dim = heads.head_dim
        details["kept_mlp"] = kept_mlp
        details["kept_kv_groups"] = kept_kv
        return {lin.name: lin.shape for layer in layers for lin in layer.linears}

    def _capture(
        self, net: nn.Module, layers: tuple[DecoderLayer, ...], input_ids: torch.Tensor
    ) -> LayerInputs:
        ids = input_ids.long()
        size = self.batch_size or calibration_batch(net, layers[0], int(ids.shape[1]))
        return capture_inputs(net, layers[0].module, ids, batch_size=size)

    def _depth(
        self,
        net: nn.Module,
        layers: tuple[DecoderLayer, ...],
        spec: PruningSpec,
        input_ids: torch.Tensor | None,
        dry_run: bool,
        details: dict[str, Any],
    ) -> set[str]:
        assert spec.depth is not None
        k = spec.depth.layers
        if k >= len(layers):
            raise InvalidSpec(
                f"depth.layers is {k} but the model has {len(layers)} decoder layers; at least "
                "one must stay"
            )
        details["num_hidden_layers"] = len(layers) - k
        by_layer = sum(_unique_params(layer.module) for layer in layers) / len(layers)
        predicted = int(_unique_params(net) - k * by_layer)
        if spec.criterion == "random":
            scores = _random_scores(len(layers), torch.Generator().manual_seed(spec.seed))
        elif input_ids is not None and spec.criterion == "taylor":
            scores = self._taylor(net, layers, input_ids, None, None).depth
            details["layer_scores"] = {
                layer.name: float(s) for layer, s in zip(layers, scores, strict=True)
            }
        elif input_ids is not None:
            scores = self._block_influence(net, layers, input_ids)
            details["layer_scores"] = {
                layer.name: float(s) for layer, s in zip(layers, scores, strict=True)
            }
        else:  # a dry run without calibration data: the sizes are known, the layers are not
            details["predicted_params_after"] = predicted
            return set()
        kept = set(_lowest(scores, k).tolist())
        removed = [layer.name for i, layer in enumerate(layers) if i not in kept]
        details["removed_layers"] = removed
        if dry_run:
            details["predicted_params_after"] = predicted
            return set(removed)
        details["renamed"] = _drop_layers(net, layers, kept)
        return set(removed)

    def _taylor(
        self,
        net: nn.Module,
        layers: tuple[DecoderLayer, ...],
        input_ids: torch.Tensor,
        blocks: list[_Block] | None,
        hidden: _Hidden | None,
    ) -> _Taylor:
        """First-order Taylor estimates |sum over tokens of a * dL/da| of the next-token loss
        change when a unit's activation ``a`` is zeroed, on the dense model (one forward and
        backward per calibration batch, the whole model at once): MLP neurons (``down_proj``
        input), heads (``o_proj`` input slices), hidden channels (residual norm outputs,
        summed over norms) and decoder layers (``a`` = output - input of the layer)."""
        scores = _Taylor(len(layers))
        handles: list[Any] = []

        def watch(key: str, index: int, x: torch.Tensor, delta: torch.Tensor | None) -> None:
            if not x.requires_grad:
                return
            value = (x if delta is None else delta).detach()

            def on_grad(grad: torch.Tensor) -> None:
                product = (value * grad).reshape(-1, value.shape[-1]).double().sum(0).cpu()
                scores.add(key, index, product)

            cast(Any, x).register_hook(on_grad)

        for index, layer in enumerate(layers):

            def layer_hook(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                out: Any,
                index: int = index,
            ) -> None:
                x_in = args[0] if args else kwargs["hidden_states"]
                x_out = out[0] if isinstance(out, (tuple, list)) else out
                watch("depth", index, x_out, x_out - x_in)

            handles.append(layer.module.register_forward_hook(layer_hook, with_kwargs=True))
            if blocks is not None:
                for key, target in (("mlp", blocks[index].down), ("o", blocks[index].o)):

                    def pre(
                        module: nn.Module, args: tuple[Any, ...], key: str = key, i: int = index
                    ) -> None:
                        watch(key, i, args[0], None)

                    handles.append(target.register_forward_pre_hook(pre))
            if hidden is not None:
                for norm in hidden.layer_norms[index]:

                    def post(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
                        watch("hidden", 0, out, None)

                    handles.append(norm.register_forward_hook(post))
        if hidden is not None:
            for norm in hidden.final_norms:

                def final(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
                    watch("hidden", 0, out, None)

                handles.append(norm.register_forward_hook(final))
        ids = input_ids.long()
        # A backward pass keeps every layer's activations: the budget is shared among them.
        budget = CALIBRATION_MEMORY // len(layers)
        size = self.batch_size or calibration_batch(net, layers[0], int(ids.shape[1]), budget)
        device = next(net.parameters()).device
        params = [p for p in net.parameters() if p.requires_grad]
        was_training = net.training
        net.eval()
        try:
            with torch.enable_grad():
                for start in range(0, int(ids.shape[0]), size):
                    batch = ids[start : start + size].to(device)
                    out = net(input_ids=batch, labels=batch, use_cache=False)
                    (out.loss * batch.shape[0]).backward()
                    for param in params:
                        param.grad = None
        finally:
            net.train(was_training)
            for handle in handles:
                handle.remove()
        return scores

    @torch.no_grad()
    def _block_influence(
        self, net: nn.Module, layers: tuple[DecoderLayer, ...], input_ids: torch.Tensor
    ) -> torch.Tensor:
        """1 - cos(input, output) of each layer, averaged over tokens, on the dense model."""
        was_training = net.training
        net.eval()
        try:
            inputs = self._capture(net, layers, input_ids)
            scores = []
            for layer in layers:
                before = inputs.hidden.clone()
                inputs.advance(layer.module)
                cos = torch.nn.functional.cosine_similarity(
                    before.float(), inputs.hidden.float(), dim=-1
                )
                scores.append(float((1.0 - cos).mean()))
        finally:
            net.train(was_training)
        return torch.tensor(scores, dtype=torch.float64)


class _Taylor:
    """Signed sums of a * dL/da per unit, collected over calibration batches; ``abs`` ranks."""

    def __init__(self, layers: int) -> None:
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.layers = layers

    def add(self, key: str, index: int, value: torch.Tensor) -> None:
        previous = self.sums.get((key, index))
        self.sums[(key, index)] = value if previous is None else previous + value

    @property
    def mlp(self) -> list[Scores]:
        return [self.sums[("mlp", i)].abs() for i in range(self.layers)]

    def kv_groups(self, index: int, heads: _Heads) -> Scores:
        # Zeroing a group zeroes all its heads: the estimate is the sum over them.
        per_group = self.sums[("o", index)].reshape(heads.kv_heads, heads.group * heads.head_dim)
        return per_group.sum(1).abs()

    @property
    def hidden(self) -> Scores:
        return self.sums[("hidden", 0)].abs()

    @property
    def depth(self) -> Scores:
        return torch.stack([self.sums[("depth", i)].sum() for i in range(self.layers)]).abs()


def _activation_stats(
    layer: DecoderLayer, block: _Block, inputs: LayerInputs
) -> dict[str, torch.Tensor]:
    down = _AbsSum(block.down.in_features)
    o = _SqSum(block.o.in_features)
    handles = [
        block.down.register_forward_pre_hook(down),
        block.o.register_forward_pre_hook(o),
    ]
    try:
        inputs.run(layer.module)
    finally:
        for handle in handles:
            handle.remove()
    tokens = max(inputs.num_tokens, 1)
    return {"down": down.total / tokens, "o": o.total}


def _width_shape(
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


def _check_config(net: nn.Module, **sizes: int) -> None:
    """Raise ``InvalidSpec`` unless the config class accepts the new sizes (transformers checks,
    for instance, that ``hidden_size`` is a multiple of ``num_attention_heads``)."""
    config: Any = net.config
    try:
        type(config).from_dict({**config.to_dict(), **sizes})
    except Exception as exc:
        raise InvalidSpec(
            f"these width fractions give sizes {sizes} that {type(config).__name__} refuses "
            f"({str(exc).strip()}); choose other fractions"
        ) from exc


def _unique_params(module: nn.Module) -> int:
    return sum(p.numel() for p in dict(module.named_parameters()).values())


def _drop_layers(
    net: nn.Module, layers: tuple[DecoderLayer, ...], kept: set[int]
) -> dict[str, str]:
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
    config: Any = net.config
    count = len(layers)
    config.num_hidden_layers = len(order)
    for key, value in list(vars(config).items()):
        if key in _PER_LAYER_LISTS and isinstance(value, list) and len(value) == count:
            setattr(config, key, [value[i] for i in order])
    return renamed


def _renamed(name: str, renamed: Mapping[str, str]) -> str:
    for old, new in renamed.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _before_shape(info: ModelInfo, name: str, linear: Linear) -> tuple[int, ...]:
    for layer in info.prunable_layers:
        if layer.name == name:
            return layer.shape
    return linear.shape
