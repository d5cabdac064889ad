"""Importance of the units ``width`` and ``depth`` remove, from weights or calibration data:
MLP neurons and key/value groups per layer (``activation``, ``magnitude``, ``random``), first-order
Taylor estimates of the loss change (``taylor``), and each decoder layer's influence on the hidden
states (``1 - cos(input, output)``). The lowest score goes first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from core.pruning.llm.calibrate import LayerInputs
from core.pruning.llm.layers import DecoderLayer
from core.pruning.llm.layouts import Attention, Block
from core.pruning.llm.sequential import CALIBRATION_MEMORY, calibration_batch
from core.pruning.llm.width import Heads, Hidden

Scores = torch.Tensor  # one score per unit; the lowest go first


def lowest(scores: Scores, removals: int) -> torch.Tensor:
    """The kept indices, ascending: all but the ``removals`` lowest scores (ties: lower index
    goes first)."""
    order = torch.argsort(scores.float().cpu(), stable=True)
    return order[removals:].sort().values


def random_scores(count: int, generator: torch.Generator) -> Scores:
    return torch.rand(count, generator=generator)


class AbsSum:
    """Forward pre-hook summing |x| per input feature over every token."""

    def __init__(self, features: int) -> None:
        self.total = torch.zeros(features, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        self.total += x.abs().sum(0, dtype=torch.float64).cpu()


class SqSum:
    """Forward pre-hook summing x^2 per input feature over every token."""

    def __init__(self, features: int) -> None:
        self.total = torch.zeros(features, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.total += x.square().sum(0).cpu()


def width_scores(
    criterion: str,
    block: Block,
    heads: Heads,
    stats: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator,
) -> tuple[Scores, Scores | None]:
    """(per MLP neuron, per key/value group) scores of one layer; no group scores where the
    layout's heads cannot be removed."""
    attn = block.attention
    if criterion == "random":
        neurons = random_scores(block.mlp.neurons, generator)
        return neurons, random_scores(heads.kv_heads, generator) if attn is not None else None
    if criterion == "magnitude":
        return block.mlp.magnitude(), _group_magnitude(attn, heads) if attn is not None else None
    assert stats is not None
    # activation: mean |x| of the MLP reader's input per neuron; per head the L2 norm of its
    # slice of the o_proj input over every token, summed over the heads of each key/value group.
    if "o" not in stats:
        return stats["mlp"], None
    per_head = stats["o"].reshape(heads.heads, heads.head_dim).sum(1).sqrt()
    return stats["mlp"], per_head.reshape(heads.kv_heads, heads.group).sum(1)


@torch.no_grad()
def _group_magnitude(attn: Attention, heads: Heads) -> Scores:
    per_head = attn.q.weight.double().square().sum(1).reshape(heads.heads, -1).sum(
        1
    ) + attn.o.weight.double().square().sum(0).reshape(heads.heads, -1).sum(1)
    per_kv = attn.k.weight.double().square().sum(1).reshape(heads.kv_heads, -1).sum(
        1
    ) + attn.v.weight.double().square().sum(1).reshape(heads.kv_heads, -1).sum(1)
    return (per_head.reshape(heads.kv_heads, heads.group).sum(1) + per_kv).sqrt().cpu()


def activation_stats(
    layer: DecoderLayer, block: Block, inputs: LayerInputs
) -> dict[str, torch.Tensor]:
    mlp = AbsSum(block.mlp.neurons)
    handles = [block.mlp.reader.module.register_forward_pre_hook(mlp)]
    o = None
    if block.attention is not None:
        o = SqSum(block.attention.o.in_features)
        handles.append(block.attention.o.register_forward_pre_hook(o))
    try:
        inputs.run(layer.module)
    finally:
        for handle in handles:
            handle.remove()
    tokens = max(inputs.num_tokens, 1)
    return {"mlp": mlp.total / tokens, **({"o": o.total} if o is not None else {})}


class TaylorScores:
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

    def kv_groups(self, index: int, heads: Heads) -> Scores | None:
        """None where the layout's heads cannot be removed (nothing was watched)."""
        if ("o", index) not in self.sums:
            return None
        # Zeroing a group zeroes all its heads: the estimate is the sum over them.
        per_group = self.sums[("o", index)].reshape(heads.kv_heads, heads.group * heads.head_dim)
        return per_group.sum(1).abs()

    @property
    def hidden(self) -> Scores:
        return self.sums[("hidden", 0)].abs()

    @property
    def depth(self) -> Scores:
        return torch.stack([self.sums[("depth", i)].sum() for i in range(self.layers)]).abs()


def taylor_scores(
    net: nn.Module,
    layers: tuple[DecoderLayer, ...],
    input_ids: torch.Tensor,
    blocks: list[Block] | None,
    hidden: Hidden | None,
    batch_size: int | None,
) -> TaylorScores:
    """First-order Taylor estimates |sum over tokens of a * dL/da| of the next-token loss
    change when a unit's activation ``a`` is zeroed, on the dense model (one forward and
    backward per calibration batch, the whole model at once): MLP neurons (``down_proj``
    input), heads (``o_proj`` input slices), hidden channels (residual norm outputs,
    summed over norms) and decoder layers (``a`` = output - input of the layer)."""
    scores = TaylorScores(len(layers))
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
            attn = blocks[index].attention
            targets = [("mlp", blocks[index].mlp.reader.module)]
            targets += [("o", attn.o)] if attn is not None else []
            for key, target in targets:

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
    size = batch_size or calibration_batch(net, layers[0], int(ids.shape[1]), budget)
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
def block_influence(
    net: nn.Module, layers: tuple[DecoderLayer, ...], inputs: LayerInputs
) -> torch.Tensor:
    """1 - cos(input, output) of each layer, averaged over tokens, on the dense model
    (``inputs`` holds the first layer's inputs; it is advanced through every layer)."""
    was_training = net.training
    net.eval()
    try:
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
