"""Magnitude, Wanda and SparseGPT on a causal language model, decoder layer by decoder layer.

Each decoder layer is calibrated on the outputs of the layers before it as already pruned: hooks
on its linears collect statistics over every calibration sample (Wanda: each input feature's
squared norm; SparseGPT: ``X X^T``), its linears are pruned, and the layer is run once more to
produce the next layer's inputs. Magnitude needs no data and runs no forward pass.

Example (a plain ``transformers`` model, no service)::

    from transformers import AutoModelForCausalLM
    from core.pruning.llm import prune_causal_lm, prunable_linears

    model = AutoModelForCausalLM.from_pretrained("path/to/checkpoint")
    ratios = {name: 0.5 for name in prunable_linears(model)}
    errors = prune_causal_lm(model, ratios, criterion="wanda", input_ids=ids)  # ids: (N, T)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from core.criteria import CRITERIA as CRITERIA_TABLE
from core.criteria import needs_data
from core.pruning.llm.calibrate import LayerInputs, capture_inputs
from core.pruning.llm.layers import DecoderLayer, Linear, decoder_layers
from core.pruning.llm.masks import FeatureNorms, Hessian, keep_mask, ranked
from core.pruning.llm.sparsegpt import reconstruction_error, sparsegpt

# The criteria table (core.criteria) says which criteria rank language models and need data.
CRITERIA = frozenset(name for name, c in CRITERIA_TABLE.items() if "hf" in c.formats)
# Tokens per calibration batch: small batches bound the attention's working memory.
TOKENS_PER_BATCH = 4096

LayerObserver = Callable[[int, DecoderLayer, LayerInputs | None], None]
"""Told ``(index, layer, inputs)`` before each decoder layer is calibrated (``inputs`` is None
for magnitude): progress reporting, and tests that look at what a layer is fed."""


@dataclass(frozen=True)
class LinearResult:
    """What pruning one linear did: ``error`` is ``||(W - W') X||^2 / tokens`` on the
    calibration data where the criterion collected ``X X^T`` (SparseGPT), else None."""

    name: str
    error: float | None = None


def _magnitude(linear: Linear, sparsity: float, n_m: tuple[int, int] | None) -> None:
    w = linear.matrix(torch.promote_types(linear.weight.dtype, torch.float32))
    keep = keep_mask(ranked(w.abs(), w), sparsity, n_m)
    linear.assign(w * keep)


def _wanda(
    linear: Linear, norms: FeatureNorms, sparsity: float, n_m: tuple[int, int] | None
) -> None:
    w = linear.matrix(torch.promote_types(linear.weight.dtype, torch.float32))
    # |W_ij| * ||X_j||_2, compared within each output row.
    scores = w.abs() * norms.sum_sq.sqrt().to(w.dtype).unsqueeze(0)
    keep = keep_mask(ranked(scores, w), sparsity, n_m)
    linear.assign(w * keep)


def _sparsegpt(
    linear: Linear, hessian: Hessian, sparsity: float, n_m: tuple[int, int] | None
) -> float:
    before = linear.matrix(torch.float32)
    after = sparsegpt(before, hessian.xxt, sparsity, n_m=n_m)
    linear.assign(after)
    return reconstruction_error(before, linear.matrix(torch.float32), hessian.xxt) / max(
        hessian.tokens, 1
    )


def _calibrate(
    layer: DecoderLayer, targets: list[Linear], inputs: LayerInputs, criterion: str
) -> dict[str, FeatureNorms | Hessian]:
    """Run ``layer`` on every sample with hooks on ``targets``; their statistics by name."""
    stats: dict[str, FeatureNorms | Hessian] = {}
    handles = []
    for linear in targets:
        device = linear.weight.device
        in_features = linear.shape[1]
        stat = (
            FeatureNorms(in_features, device)
            if criterion == "wanda"
            else Hessian(in_features, device)
        )
        stats[linear.name] = stat
        handles.append(linear.module.register_forward_hook(stat))
    try:
        inputs.run(layer.module)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def prune_causal_lm(
    model: nn.Module,
    ratios: Mapping[str, float],
    *,
    criterion: str,
    n_m: tuple[int, int] | None = None,
    input_ids: torch.Tensor | None = None,
    batch_size: int | None = None,
    on_layer: LayerObserver | None = None,
) -> dict[str, LinearResult]:
    """Prune the linears named in ``ratios`` (module path -> sparsity) in place.

    Args:
        model: a ``transformers`` causal LM (or any model with the same layout).
        ratios: the share of each output row removed per linear (with ``n_m``, any positive
            value selects the layer for n:m). Linears not named are left as they are.
        criterion: ``magnitude``, ``wanda`` or ``sparsegpt``.
        n_m: keep ``n`` of every ``m`` consecutive input features instead of a ratio.
        input_ids: ``(num_samples, seq_len)`` calibration token ids (Wanda, SparseGPT).
        batch_size: samples per forward; default about 4096 tokens per batch.
        on_layer: called before each decoder layer is calibrated.

    Returns:
        The result of every linear pruned, by name.

    Raises:
        ValueError: an unknown criterion, or a data-aware one without ``input_ids``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; one of {sorted(CRITERIA)}")
    layers = decoder_layers(model)
    inputs: LayerInputs | None = None
    if needs_data(criterion):
        if input_ids is None or input_ids.numel() == 0:
            raise ValueError(f"criterion {criterion!r} needs calibration input_ids")
        ids = input_ids.long()
        size = batch_size or max(1, TOKENS_PER_BATCH // int(ids.shape[1]))
        inputs = capture_inputs(model, layers[0].module, ids, batch_size=size)
    results: dict[str, LinearResult] = {}
    was_training = model.training
    model.eval()
    try:
        for index, layer in enumerate(layers):
            if on_layer is not None:
                on_layer(index, layer, inputs)
            targets = [lin for lin in layer.linears if ratios.get(lin.name, 0.0) > 0.0]
            if inputs is None:
                for linear in targets:
                    _magnitude(linear, ratios[linear.name], n_m)
                    results[linear.name] = LinearResult(linear.name)
                continue
            if targets:
                stats = _calibrate(layer, targets, inputs, criterion)
                for linear in targets:
                    stat = stats[linear.name]
                    if isinstance(stat, FeatureNorms):
                        _wanda(linear, stat, ratios[linear.name], n_m)
                        results[linear.name] = LinearResult(linear.name)
                    else:
                        error = _sparsegpt(linear, stat, ratios[linear.name], n_m)
                        results[linear.name] = LinearResult(linear.name, error)
                del stats
            if index + 1 < len(layers):
                inputs.advance(layer.module)
    finally:
        model.train(was_training)
    return results
