"""Magnitude, Wanda and SparseGPT on a causal language model, decoder layer by decoder layer.

Each decoder layer is calibrated on the outputs of the layers before it as already pruned: hooks
on its linears collect statistics over every calibration sample (Wanda: each input feature's
squared norm; SparseGPT: ``X X^T``), its linears are pruned, and the layer is run once more to
produce the next layer's inputs. Magnitude needs no data and runs no forward pass.

SparseGPT goes through a layer's linears in groups that read the same input (q/k/v, o, gate/up
and down in a Llama layer), last group first, each with one ``X X^T`` freed once the group is
pruned. Pruning a group changes only what the groups after it read, so every group is calibrated
on the layer as it came, as the reference code and llm-compressor calibrate all of them in one
pass. Consecutive groups whose Hessians fit in the Hessian allowance together are collected in
one pass (by default about half the layer's weight bytes: all four of a float32 Llama layer), a
group too large for it alone, each pass's forwards stopping at its last group's first linear
(nothing after it changes their inputs). The forward that groups the linears
(the first batch) also serves the Hessians collected first. Wanda's statistics are vectors: one
pass per layer, each forward after the first ending at the last linear's input. Calibration
forwards take as many samples at a time as ``memory_budget`` allows: by default a fifth of one
decoder layer's weight bytes (at least 16 MiB), at least one sample.

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

from core.allocator import release_free_memory
from core.criteria import CRITERIA as CRITERIA_TABLE
from core.criteria import needs_data
from core.pruning.llm.calibrate import LayerInputs, StopForward, capture_inputs
from core.pruning.llm.layers import DecoderLayer, Linear, decoder_layers
from core.pruning.llm.masks import FeatureNorms, Hessian, keep_mask, ranked_
from core.pruning.llm.panels import UpperPanels
from core.pruning.llm.sparsegpt import error_on_data, inverse_hessian_, sweep

# The criteria table (core.criteria) says which criteria rank language models and need data.
CRITERIA = frozenset(name for name, c in CRITERIA_TABLE.items() if "hf" in c.formats)
# Working memory a calibration forward may use where a caller sizes it as a constant (width and
# depth scoring); the samples per batch are derived from it.
CALIBRATION_MEMORY = 256 * 2**20
# prune_causal_lm's default: this share of one decoder layer's weight bytes. The memory goal
# (issue 13) allows one layer's weights + the calibration activations + 20%; pruning a linear
# needs at most about one linear's weights (plus, for SparseGPT, its Hessian), so a forward
# held to a fifth of the layer stays inside the 20%. Never less than one sample per forward.
CALIBRATION_SHARE = 0.2
# ... but never below this: on a small model one sample per forward makes pruning 2-4x slower
# (a 5 M-parameter Llama, docs/benchmarks.md), all per-forward overhead. On that model (64
# samples of 128 tokens, medians of 3) 16 MiB (5 samples per forward) prunes in the time 64 MiB
# does for SparseGPT and 7% slower for Wanda, with 60% less memory (38 against 102 MiB, 32
# against 81); 8 MiB saves 10 MiB more and costs SparseGPT 19%. At the widths the goal is measured
# at (hidden >= 1,024, 512 tokens) one sample's working set is above any of these.
CALIBRATION_FLOOR = 16 * 2**20
# The Hessians SparseGPT collects in one pass may take this share of one decoder layer's weight
# bytes (never less than the forward's budget). The four of a Llama layer are about 0.52 of its
# float32 weights at any width (``X X^T`` of the hidden width three times, of the MLP's width once,
# each as its upper triangle), so they are collected in one pass: at the 1 B widths 88 MiB of
# Hessians instead of 62 and then 26, one forward through the attention less per layer (its
# forwards 10.9 -> 7.8 s, one thread, docs/benchmarks.md), inside the memory goal's 20% (peak
# 0.94x its bound over 4 layers, 0.78x before).
# With bfloat16 weights the MLP's output projection, whose Hessian is float32, takes a pass alone.
HESSIAN_SHARE = 0.6
# Weights ranked at a time by magnitude and Wanda (whole rows): each temporary of the ranking
# (scores, the selection's copy, the masks) is then a few MiB, not the size of the weight.
RANK_ELEMENTS = 2**20

LayerObserver = Callable[[int, DecoderLayer, LayerInputs | None], None]
"""Told ``(index, layer, inputs)`` before each decoder layer is calibrated (``inputs`` is None
for magnitude): progress reporting, and tests that look at what a layer is fed."""


@dataclass(frozen=True)
class LinearResult:
    """What pruning one linear did: ``error`` is ``||(W - W') X||^2 / tokens`` on the
    calibration data where the criterion collected ``X X^T`` (SparseGPT), else None."""

    name: str
    error: float | None = None


def _prune_rows(
    linear: Linear, sparsity: float, n_m: tuple[int, int] | None, scale: torch.Tensor | None
) -> None:
    """Zero the lowest ``|W_ij| (x scale_j)`` of every output row of ``linear``, in place and a
    few rows at a time: the scores, their ranking and the mask of a whole wide linear would each
    be as large as its weight."""
    weight = linear.weight.detach()
    matrix = weight.t() if linear.transposed else weight  # (out, in), a view
    dtype = torch.promote_types(weight.dtype, torch.float32)
    factor = None if scale is None else scale.to(dtype).unsqueeze(0)
    step = max(1, RANK_ELEMENTS // matrix.shape[1])
    for start in range(0, matrix.shape[0], step):
        rows = matrix[start : start + step]
        w = rows.to(dtype)
        scores = w.abs() if factor is None else w.abs().mul_(factor)
        rows.mul_(keep_mask(ranked_(scores, w), sparsity, n_m))


def _magnitude(linear: Linear, sparsity: float, n_m: tuple[int, int] | None) -> None:
    _prune_rows(linear, sparsity, n_m, None)


def _wanda(
    linear: Linear, norms: FeatureNorms, sparsity: float, n_m: tuple[int, int] | None
) -> None:
    # |W_ij| * ||X_j||_2, compared within each output row.
    _prune_rows(linear, sparsity, n_m, norms.sum_sq.sqrt())


def _sparsegpt(
    group: list[Linear],
    hessian: Hessian,
    ratios: Mapping[str, float],
    n_m: tuple[int, int] | None,
) -> dict[str, LinearResult]:
    """Prune a group of linears that read the same input with its one Hessian, which is
    factored in place: the Hessian's buffer and one linear's float32 copy are the largest
    things alive."""
    hinv = inverse_hessian_(hessian.xxt)
    tokens = max(hessian.tokens, 1)
    results = {}
    for linear in group:
        w = linear.matrix(torch.float32)
        swept = sweep(w, hinv, ratios[linear.name], n_m=n_m)
        weight = linear.weight.detach()
        before = weight.t() if linear.transposed else weight
        error = error_on_data(before, w, hinv, swept) / tokens
        linear.assign(w)
        del w
        results[linear.name] = LinearResult(linear.name, error)
    return results


def default_memory_budget(layer: DecoderLayer) -> int:
    """``CALIBRATION_SHARE`` of ``layer``'s weight bytes, at least ``CALIBRATION_FLOOR``: the
    working memory a calibration forward gets unless the caller says otherwise."""
    return max(int(_weight_bytes(layer) * CALIBRATION_SHARE), CALIBRATION_FLOOR)


def default_hessian_budget(layer: DecoderLayer) -> int:
    """``HESSIAN_SHARE`` of ``layer``'s weight bytes, at least :func:`default_memory_budget`:
    the bytes of the SparseGPT Hessians collected in one pass unless the caller says otherwise."""
    return max(int(_weight_bytes(layer) * HESSIAN_SHARE), default_memory_budget(layer))


def _weight_bytes(layer: DecoderLayer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.module.parameters())


def calibration_batch(
    model: nn.Module, layer: DecoderLayer, seq_len: int, memory_budget: int = CALIBRATION_MEMORY
) -> int:
    """Samples per calibration forward that keep one decoder layer's working memory within
    ``memory_budget`` bytes: per token, every linear's output (and about as much again for
    activations and the float32 copies the hooks take) plus one attention score per head."""
    element = max(lin.weight.element_size() for lin in layer.linears)
    outputs = sum(lin.shape[0] for lin in layer.linears)
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    per_sample = seq_len * max(element, 4) * (2 * outputs + heads * seq_len)
    return max(1, memory_budget // per_sample)


def _collect_norms(
    layer: DecoderLayer, targets: list[Linear], inputs: LayerInputs
) -> dict[str, FeatureNorms]:
    """Run ``layer`` on every sample with hooks on ``targets``; Wanda's statistics by name.

    The first batch runs the whole layer and gives the order the linears are called in. Where
    each target was called exactly once, later batches stop at the last one's input
    (:class:`StopForward`): what comes after it (``down_proj`` itself and the residual in a
    Llama layer, about a quarter of its products) changes no statistic.

    Linears called one after another on the same tensor (q/k/v, gate/up) share its norms,
    computed once.
    """
    stats: dict[str, FeatureNorms] = {}
    order: list[str] = []
    last: list[str] = []  # the name to stop at, once known
    # The input seen last and its terms; the tensor itself is held, so no later input can reuse
    # its memory and pass for it.
    previous: list[tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]] = []

    def hook(
        name: str, stat: FeatureNorms
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def collect(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not previous or previous[0][0] is not args[0]:
                previous[:] = [(args[0], FeatureNorms.terms(args[0]))]
            stat.add(previous[0][1])
            order.append(name)
            if last and name == last[0]:
                raise StopForward

        return collect

    handles = []
    for linear in targets:
        stat = FeatureNorms(linear.shape[1], linear.weight.device)
        stats[linear.name] = stat
        handles.append(linear.module.register_forward_pre_hook(hook(linear.name, stat)))
    try:
        inputs.run(layer.module, batches=1)
        if len(order) == len(targets) and set(order) == set(stats):
            last.append(order[-1])
        inputs.run(layer.module, start=1)
    finally:
        for handle in handles:
            handle.remove()
        previous.clear()
    return stats


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input tensor; ``called_once``: the layer calls the first of
    them exactly once per forward (so a forward may stop at that call)."""

    linears: list[Linear]
    called_once: bool

    @property
    def hessian_bytes(self) -> int:
        """The size of the group's one ``X X^T`` (float32, its upper triangle in panels)."""
        return UpperPanels.numel(self.linears[0].shape[1]) * 4


@dataclass(frozen=True)
class _Probe:
    """What one forward of the first batch tells about a layer: ``groups`` (see
    :func:`input_groups`) and ``first``, each group's input in that batch by its first linear's
    name (for groups called once), so the Hessians collected before anything is pruned need not
    run that batch again."""

    groups: list[InputGroup]
    first: dict[str, torch.Tensor]


def _probe(layer: DecoderLayer, targets: list[Linear], inputs: LayerInputs) -> _Probe:
    seen: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            # The tensor itself is kept, so no later input can reuse its memory and look equal.
            seen.setdefault(name, args[0])
            calls[name] = calls.get(name, 0) + 1

        return record

    handles = [lin.module.register_forward_pre_hook(hook(lin.name)) for lin in targets]
    try:
        inputs.run(layer.module, batches=1)
    finally:
        for handle in handles:
            handle.remove()
    members: list[tuple[torch.Tensor | None, list[Linear]]] = []
    by_name = {lin.name: lin for lin in targets}
    for name, x in seen.items():
        group = next((g for key, g in members if key is x), None)
        if group is None:
            members.append((x, [by_name[name]]))
        else:
            group.append(by_name[name])
    members += [(None, [lin]) for lin in targets if lin.name not in seen]
    groups = [InputGroup(group, calls.get(group[0].name) == 1) for _, group in members]
    first = {
        g.linears[0].name: x
        for (x, _), g in zip(members, groups, strict=True)
        if x is not None and g.called_once
    }
    return _Probe(groups, first)


def input_groups(
    layer: DecoderLayer, targets: list[Linear], inputs: LayerInputs
) -> list[InputGroup]:
    """``targets`` grouped by the input tensor they read, groups in the order the layer calls
    them (one forward of the first batch; linears it never calls come last, each alone)."""
    return _probe(layer, targets, inputs).groups


def _collect_hessians(
    layer: DecoderLayer,
    groups: list[InputGroup],
    inputs: LayerInputs,
    first: dict[str, torch.Tensor] | None = None,
) -> list[Hessian]:
    """``X X^T`` of the input each of ``groups`` reads (given in the order the layer calls
    them), over every sample, in one pass.

    Where the layer calls each group's first linear once per forward, each forward stops at the
    last of them (:class:`StopForward`): nothing after it can change what the groups read, so a
    Llama layer's four groups collected one by one cost about one forward of the layer, not four.
    ``first``: the first batch's inputs by first-linear name (:class:`_Probe`), taken instead of
    running that batch where every group has one. ``first`` is emptied, each input once added:
    none is held through the pass (a Llama layer's four are 24 MiB at the 1 B widths).
    """
    leads = [group.linears[0] for group in groups]
    hessians = [Hessian(lead.shape[1], lead.weight.device) for lead in leads]
    stops = all(group.called_once for group in groups)
    start = 0
    if first is not None and stops and all(lead.name in first for lead in leads):
        for lead, hessian in zip(leads, hessians, strict=True):
            hessian(lead.module, (first.pop(lead.name),), None)
        start = 1
    if first is not None:
        first.clear()

    def collect(
        hessian: Hessian, last: bool
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            hessian(module, args, None)
            if last and stops:
                raise StopForward

        return hook

    handles = [
        lead.module.register_forward_pre_hook(collect(hessian, lead is leads[-1]))
        for lead, hessian in zip(leads, hessians, strict=True)
    ]
    try:
        inputs.run(layer.module, start=start)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _rounds_last_first(groups: list[InputGroup], budget: int) -> list[list[InputGroup]]:
    """``groups`` (in the order the layer calls them) cut into runs whose Hessians together fit
    in ``budget``, the last run first: each run's Hessians are collected in one pass, and a
    group too large for the budget is a run of its own.

    Last first: pruning a group changes only what the groups after it read, so every group is
    calibrated on the layer as it came (what the reference code and llm-compressor do, all
    groups at once). Packed from the end, the runs of a Llama layer at the 1 B widths are
    ``[down]`` (62 MiB) and ``[q/k/v, o, gate/up]`` (3 x 8.5 MiB) against a 64 MiB budget: two
    Hessian passes, not four; one against the default allowance (:func:`default_hessian_budget`,
    101 MiB there).
    """
    rounds: list[list[InputGroup]] = []
    size = budget + 1  # the first group always opens a run
    for group in reversed(groups):
        if size + group.hessian_bytes <= budget:
            rounds[-1].insert(0, group)
            size += group.hessian_bytes
        else:
            rounds.append([group])
            size = group.hessian_bytes
    return rounds


def _prune_layer(
    layer: DecoderLayer,
    targets: list[Linear],
    inputs: LayerInputs,
    ratios: Mapping[str, float],
    criterion: str,
    n_m: tuple[int, int] | None,
    true_sequential: bool = False,
    hessian_budget: int = 0,
) -> dict[str, LinearResult]:
    results: dict[str, LinearResult] = {}
    if criterion == "wanda":
        stats = _collect_norms(layer, targets, inputs)
        for linear in targets:
            _wanda(linear, stats.pop(linear.name), ratios[linear.name], n_m)
            results[linear.name] = LinearResult(linear.name)
        return results
    probe = _probe(layer, targets, inputs)
    groups = probe.groups
    # ``true_sequential``: first group first, each calibrated on the groups before it as pruned
    # (GPTQ's --true-sequential).
    rounds = (
        [[group] for group in groups]
        if true_sequential
        else _rounds_last_first(groups, hessian_budget)
    )
    # The grouping batch's inputs serve the first round (nothing is pruned before it); the
    # others are dropped now, not held through that round's forwards.
    leads = {group.linears[0].name for group in rounds[0]}
    first: dict[str, torch.Tensor] | None = {
        name: x for name, x in probe.first.items() if name in leads
    }
    del probe
    for members in rounds:
        pending = list(zip(members, _collect_hessians(layer, members, inputs, first), strict=True))
        first = None
        release_free_memory()  # the forwards' temporaries, before the sweeps' largest buffers
        while pending:
            group, hessian = pending.pop()  # the last the layer calls first; freed once done
            results.update(_sparsegpt(group.linears, hessian, ratios, n_m))
            del group, hessian
    return {lin.name: results[lin.name] for group in groups for lin in group.linears}


@torch.no_grad()
def prune_causal_lm(
    model: nn.Module,
    ratios: Mapping[str, float],
    *,
    criterion: str,
    n_m: tuple[int, int] | None = None,
    input_ids: torch.Tensor | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    on_layer: LayerObserver | None = None,
    true_sequential: bool = False,
) -> dict[str, LinearResult]:
    """Prune the linears named in ``ratios`` (module path -> sparsity) in place.

    Args:
        model: a ``transformers`` causal LM (or any model with the same layout).
        ratios: the share of each output row removed per linear (with ``n_m``, any positive
            value selects the layer for n:m). Linears not named are left as they are.
        criterion: ``magnitude``, ``wanda`` or ``sparsegpt``.
        n_m: keep ``n`` of every ``m`` consecutive input features instead of a ratio.
        input_ids: ``(num_samples, seq_len)`` calibration token ids (Wanda, SparseGPT).
        batch_size: samples per forward; default: as many as ``memory_budget`` allows.
        memory_budget: bytes a calibration forward may use (see :func:`calibration_batch`),
            and the SparseGPT Hessians collected together in one pass; default:
            ``CALIBRATION_SHARE`` of the first decoder layer's weight bytes for a forward,
            ``HESSIAN_SHARE`` for the Hessians (:func:`default_hessian_budget`).
        on_layer: called before each decoder layer is calibrated.
        true_sequential: SparseGPT calibrates each group of a layer's linears on the groups
            before it as already pruned, instead of on the layer as it came (the default, as
            the reference code does). On a trained 4.9 M Llama: perplexity 1.2% lower at 70%,
            0.2% and 1.5% higher at 50% and 2:4 (docs/benchmarks.md).

    Returns:
        The result of every linear pruned, by name.

    Raises:
        ValueError: an unknown criterion, or a data-aware one without ``input_ids``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; one of {sorted(CRITERIA)}")
    layers = decoder_layers(model)
    inputs: LayerInputs | None = None
    hessians = 0
    if needs_data(criterion):
        if input_ids is None or input_ids.numel() == 0:
            raise ValueError(f"criterion {criterion!r} needs calibration input_ids")
        ids = input_ids.long()
        budget = default_memory_budget(layers[0]) if memory_budget is None else memory_budget
        hessians = default_hessian_budget(layers[0]) if memory_budget is None else memory_budget
        size = batch_size or calibration_batch(model, layers[0], int(ids.shape[1]), budget)
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
                results.update(
                    _prune_layer(
                        layer, targets, inputs, ratios, criterion, n_m, true_sequential, hessians
                    )
                )
            if index + 1 < len(layers):
                inputs.advance(layer.module)
    finally:
        model.train(was_training)
    return results
