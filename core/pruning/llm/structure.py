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
``num_attention_heads``) are refused with ``InvalidSpec`` before anything changes. Which modules
carry the units, and which config keys name the sizes, comes from the registered layouts of
:mod:`.layouts`: the Llama layout (Llama, Mistral, Qwen2, Qwen3) takes all three parts; GPT-2
takes ``mlp`` (``n_inner``) and refuses ``heads`` and ``hidden``, which its fixed head size
(``n_embd / n_head``) cannot express.

``depth`` removes the ``k`` decoder layers whose removal changes the hidden states least:
``activation`` scores a layer ``1 - cos(input, output)`` averaged over the calibration tokens
(one pass through the dense model, layer by layer); ``random`` ranks them at random (``seed``).
The kept layers are renumbered (``layer_idx`` of every submodule that has one, for the KV cache),
and ``num_hidden_layers`` and per-layer config lists (``layer_types``) are rewritten.

Reported per prunable linear of the *original* model (``PruneOutcome.layers``): a linear whose
decoder layer was removed has ``shape_after == (0, 0)`` and no parameters; ``details["renamed"]``
maps the old module path of every kept, renumbered decoder layer to its new one.

This module orchestrates; the parts live beside it: :mod:`.importance` (scores),
:mod:`.layouts` (where the units are, per architecture), :mod:`.width` (slicing), :mod:`.depth`
(removing layers) and :mod:`.llm_config` (checking and rewriting the config).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.allocation import removal_count
from core.errors import InvalidSpec, PruningError
from core.formats.base import ModelInfo
from core.metrics import sparse_size_bytes
from core.pruning.base import LayerResult, PruneContext, PruneOutcome
from core.pruning.llm.calibrate import LayerInputs, calibration_ids, capture_inputs
from core.pruning.llm.depth import drop_layers, renamed_path
from core.pruning.llm.importance import (
    TaylorScores,
    activation_stats,
    block_influence,
    lowest,
    random_scores,
    taylor_scores,
    width_scores,
)
from core.pruning.llm.layers import DecoderLayer, Linear, decoder_layers, prunable_linears, unwrap
from core.pruning.llm.layouts import Sizes, layout_named, layout_of, refuse_parts
from core.pruning.llm.llm_config import check_config, write_sizes
from core.pruning.llm.sequential import calibration_batch
from core.pruning.llm.width import Hidden, head_layout, prune_width_layer
from core.spec import PruningSpec

WIDTH_CRITERIA = frozenset({"activation", "magnitude", "random", "taylor"})
DEPTH_CRITERIA = frozenset({"activation", "random", "taylor"})
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _removals(fraction: float, count: int) -> int:
    """round(fraction x count), halves up, as every pruner counts."""
    return removal_count(fraction, count)


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
        if spec.width is not None:
            # Layer names alone tell the layout: the API refuses (422) before anything is queued.
            inside = {n[m.end() :] for n in layers if (m := _LAYER_INDEX.search(n))}
            layout = layout_named(inside)
            if layout is not None:
                refuse_parts(layout, spec.width)
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
                (f"{renamed_path(n, details.get('renamed', {}))}.weight" for n in sorted(live)),
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
        layout, blocks = layout_of(layers)
        refuse_parts(layout, spec.width)
        heads = head_layout(net)
        neurons = blocks[0].mlp.neurons
        drop_mlp = _removals(spec.width.mlp, neurons)
        drop_kv = _removals(spec.width.heads, heads.kv_heads)
        if drop_mlp >= neurons or drop_kv >= heads.kv_heads:
            raise InvalidSpec(
                f"width removes {drop_mlp} of {neurons} MLP neurons and {drop_kv} of "
                f"{heads.kv_heads} key/value groups per layer; at least one of each must stay"
            )
        hidden = Hidden.of(net, layers)
        drop_hidden = _removals(spec.width.hidden, hidden.size)
        if drop_hidden >= hidden.size:
            raise InvalidSpec(f"width.hidden removes all {hidden.size} hidden channels")
        new_kv = heads.kv_heads - drop_kv
        new = Sizes(
            hidden=hidden.size - drop_hidden,
            mlp=neurons - drop_mlp,
            heads=new_kv * heads.group,
            kv_heads=new_kv,
            head_dim=heads.head_dim,
        )
        sizes = layout.config_sizes(new)
        check_config(net, **sizes)
        details["layout"] = layout.name
        details["hidden_size"] = new.hidden
        details["intermediate_size"] = new.mlp
        details["num_key_value_heads"] = new.kv_heads
        details["num_attention_heads"] = new.heads
        if dry_run:
            shapes = {lin.name: lin.shape for layer in layers for lin in layer.linears} | {
                name: shape for b in blocks for name, shape in b.shapes(new).items()
            }
            linears = {lin.name: lin for layer in layers for lin in layer.linears}
            removed = sum(
                _linear_params(linears[name].shape, linears[name])
                - _linear_params(shape, linears[name])
                for name, shape in shapes.items()
            )
            removed += drop_hidden * hidden.norm_and_embedding_per_channel()
            details["predicted_params_after"] = unique_params(net) - removed
            return shapes
        inputs = None
        taylor: TaylorScores | None = None
        if spec.criterion == "activation":
            assert input_ids is not None
            inputs = self._capture(net, layers, input_ids)
        elif spec.criterion == "taylor":
            assert input_ids is not None
            taylor = taylor_scores(
                net, layers, input_ids, blocks, hidden if drop_hidden else None, self.batch_size
            )
        generator = torch.Generator().manual_seed(spec.seed)
        kept_mlp: dict[str, list[int]] = {}
        kept_kv: dict[str, list[int]] = {}
        was_training = net.training
        net.eval()
        try:
            for index, (layer, block) in enumerate(zip(layers, blocks, strict=True)):
                stats = None
                if inputs is not None:
                    stats = activation_stats(layer, block, inputs)
                mlp_scores, kv_scores = (
                    width_scores(spec.criterion, block, heads, stats, generator)
                    if taylor is None
                    else (taylor.mlp[index], taylor.kv_groups(index, heads))
                )
                keep_mlp = lowest(mlp_scores, drop_mlp) if drop_mlp else None
                keep_kv = lowest(kv_scores, drop_kv) if drop_kv and kv_scores is not None else None
                prune_width_layer(block, heads, keep_mlp, keep_kv)
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
                    else random_scores(hidden.size, generator)
                )
                keep_hidden = lowest(scores, drop_hidden)
                hidden.prune(net, blocks, keep_hidden)
                details["kept_hidden"] = keep_hidden.tolist()
        finally:
            net.train(was_training)
        write_sizes(net, **sizes)
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
        by_layer = sum(unique_params(layer.module) for layer in layers) / len(layers)
        predicted = int(unique_params(net) - k * by_layer)
        if spec.criterion == "random":
            scores = random_scores(len(layers), torch.Generator().manual_seed(spec.seed))
        elif input_ids is not None and spec.criterion == "taylor":
            scores = taylor_scores(net, layers, input_ids, None, None, self.batch_size).depth
            details["layer_scores"] = {
                layer.name: float(s) for layer, s in zip(layers, scores, strict=True)
            }
        elif input_ids is not None:
            scores = block_influence(net, layers, self._capture(net, layers, input_ids))
            details["layer_scores"] = {
                layer.name: float(s) for layer, s in zip(layers, scores, strict=True)
            }
        else:  # a dry run without calibration data: the sizes are known, the layers are not
            details["predicted_params_after"] = predicted
            return set()
        kept = set(lowest(scores, k).tolist())
        removed = [layer.name for i, layer in enumerate(layers) if i not in kept]
        details["removed_layers"] = removed
        if dry_run:
            details["predicted_params_after"] = predicted
            return set(removed)
        details["renamed"] = drop_layers(net, layers, kept)
        return set(removed)


def _linear_params(shape: tuple[int, int], linear: Linear) -> int:
    """Weight and bias of ``linear`` at ``(out, in)`` = ``shape``."""
    has_bias = getattr(linear.module, "bias", None) is not None
    return shape[0] * shape[1] + shape[0] * int(has_bias)


def unique_params(module: nn.Module) -> int:
    return sum(p.numel() for p in dict(module.named_parameters()).values())


def _before_shape(info: ModelInfo, name: str, linear: Linear) -> tuple[int, ...]:
    for layer in info.prunable_layers:
        if layer.name == name:
            return layer.shape
    return linear.shape
