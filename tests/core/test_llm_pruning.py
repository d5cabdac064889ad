"""Language-model pruning (hf, unstructured and n:m): exact counts, references written out plainly,
sequential calibration, the activation buffer's size, and the methods' order on a trained model.

Everything runs on tiny transformers models built from configs (no hub); one thread, because the
per-column SparseGPT sweep is many small ops that thread contention slows tenfold.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from core.allocation import removal_count
from core.errors import InvalidSpec
from core.formats.base import ModelInfo, PrunableLayer
from core.pruning import PruneContext, run_rounds
from core.pruning.llm import (
    LanguageModelPruner,
    LayerInputs,
    capture_inputs,
    decoder_layers,
    prunable_linears,
    prune_causal_lm,
    sequential,
)
from core.pruning.llm.layers import Linear
from core.pruning.llm.masks import FeatureNorms, Hessian, planned_removals, row_mask
from core.pruning.llm.panels import UpperPanels, invert_factor_
from core.pruning.llm.sparsegpt import (
    DAMPING,
    error_on_data,
    inverse_hessian_,
    reconstruction_error,
    sparsegpt,
    sweep,
)
from core.spec import PruningSpec
from core.unstructured import kth_lowest

VOCAB = 256


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(max_positions: int = 256, seed: int = 0) -> LlamaForCausalLM:
    """Llama with GQA: 4 heads, 2 key/value heads, hidden 64, 2 layers."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def calibration_ids(samples: int = 8, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, seq_len), generator=generator)


def info_of(model: nn.Module) -> ModelInfo:
    """What the hf format's gate will state: the decoder linears, (out, in)."""
    layers = tuple(
        PrunableLayer(name, "linear", lin.shape, lin.weight.numel())
        for name, lin in prunable_linears(model).items()
    )
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(format="hf", num_parameters=params, inputs=(), prunable_layers=layers)


def matrix(module: nn.Module) -> torch.Tensor:
    """A linear's weight as (out, in) (GPT-2's Conv1D stores it (in, out))."""
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Linear) else weight.t()


def prune(model: Any, spec: PruningSpec, ids: torch.Tensor | None = None, **kw: Any) -> Any:
    net = model if isinstance(model, nn.Module) else model.model
    ctx = PruneContext(calibration=(ids,) if ids is not None else None, **kw)
    return run_rounds(LanguageModelPruner(batch_size=3), model, info_of(net), spec, ctx)


# -- exact counts --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_removes_exactly_what_the_spec_says(arch: str, criterion: str) -> None:
    model = BUILD[arch]()
    dense = copy.deepcopy(model)
    spec = PruningSpec(criterion=criterion, granularity="unstructured", sparsity=0.6)

    outcome = prune(model, spec, calibration_ids())

    linears = prunable_linears(model)
    assert [layer.name for layer in outcome.layers] == list(linears)
    for layer in outcome.layers:
        w = matrix(linears[layer.name].module)
        zeros_per_row = (w == 0).sum(dim=1)
        if criterion == "sparsegpt":
            # Each block of 128 input columns loses round(s x out x width): within 0.5% of s.
            assert abs(layer.sparsity - 0.6) < 0.005, layer
            expected = sum(
                removal_count(0.6, w.shape[0] * (min(c + 128, w.shape[1]) - c))
                for c in range(0, w.shape[1], 128)
            )
            assert int((w == 0).sum()) == expected, layer.name
        else:
            assert (zeros_per_row == removal_count(0.6, w.shape[1])).all(), layer.name
        assert layer.nonzero == int(w.count_nonzero())
        assert layer.shape_before == layer.shape_after == tuple(w.shape)
    # Nothing outside the decoder linears changed: embeddings, norms, lm_head, biases.
    for (name, before), after in zip(dense.named_parameters(), model.parameters(), strict=True):
        if name.removesuffix(".weight") not in linears:
            assert torch.equal(before, after), name
    assert outcome.params_after == sum(p.numel() for p in model.parameters())
    assert outcome.nonzero_params_after == sum(int(p.count_nonzero()) for p in model.parameters())
    assert 0 < outcome.sparse_size_bytes < sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n_m", [(2, 4), (4, 8)])
def test_n_m_keeps_n_of_every_run_of_m_inputs(criterion: str, n_m: tuple[int, int]) -> None:
    for model in (tiny_llama(), tiny_gpt2()):
        spec = PruningSpec(criterion=criterion, granularity="n:m", n_m=n_m)
        prune(model, spec, calibration_ids())
        for name, linear in prunable_linears(model).items():
            w = matrix(linear.module)
            runs = (w != 0).reshape(w.shape[0], -1, n_m[1]).sum(dim=-1)
            assert (runs == n_m[0]).all(), name


def test_exclude_and_layer_sparsity_follow_module_paths() -> None:
    model = tiny_llama()
    dense = copy.deepcopy(model)
    spec = PruningSpec(
        criterion="wanda",
        granularity="unstructured",
        sparsity=0.5,
        exclude=("model.layers.0.self_attn.*",),
        layer_sparsity={"*.mlp.down_proj": 0.75, "model.layers.1.self_attn.q_proj": 0.0},
    )
    outcome = prune(model, spec, calibration_ids())

    before = prunable_linears(dense)
    expected_excluded = tuple(n for n in before if n.startswith("model.layers.0.self_attn."))
    assert outcome.excluded == expected_excluded
    for name, linear in prunable_linears(model).items():
        w = matrix(linear.module)
        if name in expected_excluded or name == "model.layers.1.self_attn.q_proj":
            assert torch.equal(w, matrix(before[name].module)), name
        else:
            ratio = 0.75 if name.endswith("down_proj") else 0.5
            assert ((w == 0).sum(dim=1) == removal_count(ratio, w.shape[1])).all(), name


def test_refusals_say_what_to_do() -> None:
    pruner = LanguageModelPruner()
    layers = {"model.layers.0.mlp.up_proj": 100}
    with pytest.raises(InvalidSpec, match="scope 'layer'"):
        pruner.preflight(
            PruningSpec(
                criterion="magnitude", granularity="unstructured", sparsity=0.5, scope="global"
            ),
            layers,
        )
    with pytest.raises(InvalidSpec, match="use exclude"):
        pruner.preflight(
            PruningSpec(criterion="wanda", granularity="n:m", layer_sparsity={"*": 0.5}), layers
        )
    with pytest.raises(InvalidSpec, match="match no prunable layer"):
        pruner.preflight(
            PruningSpec(
                criterion="wanda",
                granularity="unstructured",
                sparsity=0.5,
                exclude=("model.layers.9.*",),
            ),
            layers,
        )
    with pytest.raises(InvalidSpec, match="needs calibration"):
        prune(
            tiny_llama(),
            PruningSpec(criterion="sparsegpt", granularity="unstructured", sparsity=0.5),
        )


def test_dry_run_reports_the_plan_and_changes_nothing() -> None:
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        spec = PruningSpec(criterion=criterion, granularity="unstructured", sparsity=0.7)
        model = tiny_llama()
        dense = copy.deepcopy(model)
        planned = prune(model, spec, None, dry_run=True)  # no data needed for the plan
        for a, b in zip(dense.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)
        done = prune(model, spec, calibration_ids())
        assert [lr.nonzero for lr in planned.layers] == [lr.nonzero for lr in done.layers]
        assert planned.nonzero_params_after == done.nonzero_params_after


def test_the_model_object_may_hold_the_model() -> None:
    """The hf format hands over an object whose ``.model`` is the transformers model."""
    holder = SimpleNamespace(model=tiny_llama(), tokenizer=None)
    spec = PruningSpec(criterion="wanda", granularity="unstructured", sparsity=0.5)
    outcome = prune(holder, spec, calibration_ids())
    assert outcome.model is holder
    assert all(layer.sparsity == 0.5 for layer in outcome.layers)


def test_iterative_rounds_nest_and_hold_zeros_after_the_hook() -> None:
    model = tiny_llama()
    spec = PruningSpec(
        criterion="sparsegpt",
        granularity="unstructured",
        sparsity=0.6,
        schedule={"kind": "iterative", "rounds": 3},
    )
    seen: list[torch.Tensor] = []

    def retrain(t: int, rounds: int, m: Any) -> None:
        up = prunable_linears(m)["model.layers.1.mlp.up_proj"].weight
        seen.append(up.detach() == 0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)  # "training" moves every weight, pruned ones included

    pruner = LanguageModelPruner(batch_size=4)
    outcome = run_rounds(
        pruner,
        model,
        info_of(model),
        spec,
        PruneContext(calibration=(calibration_ids(),)),
        on_round=retrain,
    )
    final = prunable_linears(model)["model.layers.1.mlp.up_proj"].weight == 0
    assert len(seen) == 2
    # Nested masks: a weight zeroed in a round stays zero, through the retraining hook too.
    assert (seen[0] <= seen[1]).all()
    assert (seen[1] <= final).all()
    assert all(abs(layer.sparsity - 0.6) < 0.005 for layer in outcome.layers)


# -- sequential calibration ----------------------------------------------------------------------


def _record_inputs(layer: nn.Module, run: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The hidden states and keyword arguments ``layer`` is called with while ``run()`` runs."""
    got: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["hidden"], got["kwargs"] = args[0].detach().clone(), kwargs

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return got["hidden"], got["kwargs"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_layer_is_calibrated_on_the_pruned_layers_before_it(arch: str) -> None:
    model = BUILD[arch]()
    ids = calibration_ids()
    fed: dict[int, torch.Tensor] = {}
    kwargs: dict[int, dict[str, Any]] = {}

    def observe(index: int, layer: Any, inputs: LayerInputs | None) -> None:
        assert inputs is not None
        fed[index] = inputs.hidden.clone()
        kwargs[index] = inputs.kwargs()

    ratios = {name: 0.5 for name in prunable_linears(model)}
    prune_causal_lm(model, ratios, criterion="wanda", input_ids=ids, batch_size=3, on_layer=observe)

    # Layer 1 was fed what the pruned model really gives it.
    layer1 = decoder_layers(model)[1].module
    hidden, real_kwargs = _record_inputs(layer1, lambda: model(input_ids=ids, use_cache=False))
    torch.testing.assert_close(fed[1], hidden, rtol=1e-5, atol=1e-5)
    assert fed[0].shape == (8, 32, 64)
    if arch == "llama":
        cos, sin = kwargs[0]["position_embeddings"]  # newer transformers pass (cos, sin)
        assert cos.shape[-2:] == sin.shape[-2:] == (32, 16)
        torch.testing.assert_close(cos, real_kwargs["position_embeddings"][0])


def test_the_buffer_is_sized_by_the_calibration_data_not_the_context() -> None:
    """A config allowing a billion positions: anything sized from it (as the Wanda reference
    sizes its buffer from max_position_embeddings) would need terabytes."""
    model = tiny_llama(max_positions=1_000_000_000)
    sizes: list[int] = []

    def observe(index: int, layer: Any, inputs: LayerInputs | None) -> None:
        assert inputs is not None
        sizes.append(inputs.hidden.numel())
        assert len({id(call.kwargs["position_embeddings"]) for call in inputs.calls}) == 1

    ratios = {name: 0.5 for name in prunable_linears(model)}
    prune_causal_lm(
        model,
        ratios,
        criterion="sparsegpt",
        input_ids=calibration_ids(6, 16),
        batch_size=2,
        on_layer=observe,
    )
    assert sizes == [6 * 16 * 64, 6 * 16 * 64]  # num_samples x seq_len x hidden, per layer


# -- reference implementations, written out plainly -----------------------------------------------


def _blocks(model: nn.Module) -> nn.ModuleList:
    inner = model.model if isinstance(model, LlamaForCausalLM) else model.transformer
    return inner.layers if isinstance(model, LlamaForCausalLM) else inner.h


def _linear_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Run the whole model once; every token's input to each linear of ``block``, (tokens, in)."""
    xs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":

            def hook(m: nn.Module, inputs: Any, out: Any, name: str = name) -> None:
                xs[name] = inputs[0].reshape(-1, inputs[0].shape[-1]).double()

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {name: (dict(block.named_modules())[name], x) for name, x in xs.items()}


def _reference_sparsegpt(w: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
    """Algorithm 1 of the SparseGPT paper with B = Bs = 128, every update applied at once."""
    w = w.double().clone()
    cols = w.shape[1]
    h = 2 * x.t() @ x
    h += 0.01 * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    for j in range(cols):
        if j % 128 == 0:
            block = slice(j, min(j + 128, cols))
            score = w[:, block] ** 2 / hinv.diagonal()[block] ** 2
            k = removal_count(s, score.numel())
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[score.flatten().argsort()[:k]] = True
            mask[:, block] = flat.reshape(score.shape)
        err = w[:, j] / hinv[j, j] * mask[:, j]
        w[:, j:] -= torch.outer(err, hinv[j, j:])
    return w * ~mask


def _reference_prune(model: nn.Module, ids: torch.Tensor, criterion: str, s: float) -> list[float]:
    """Layer by layer: run the whole (partly pruned) model for each layer's inputs, prune its
    linears the obvious way. Returns SparseGPT's ||(W - W')X||^2 / tokens per linear."""
    errors = []
    for block in _blocks(model):
        for module, x in _linear_inputs(model, block, ids).values():
            w = matrix(module).double()
            if criterion == "sparsegpt":
                new = _reference_sparsegpt(w, x, s)
                errors.append(float(((w - new) @ x.t()).square().sum()) / x.shape[0])
            else:
                score = w.abs() * (x.square().sum(0).sqrt() if criterion == "wanda" else 1)
                k = removal_count(s, w.shape[1])
                new = w.clone()
                new.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], 0.0)
            with torch.no_grad():
                target = new if isinstance(module, nn.Linear) else new.t()
                module.weight.copy_(target.to(module.weight.dtype))
    return errors


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_masks_match_a_plain_reference(arch: str, criterion: str) -> None:
    ids = calibration_ids()
    ours = BUILD[arch]().double()  # float64: no near-tie flips from summation order
    reference = copy.deepcopy(ours)
    spec = PruningSpec(criterion=criterion, granularity="unstructured", sparsity=0.5)

    prune(ours, spec, ids)
    _reference_prune(reference, ids, criterion, 0.5)

    theirs = prunable_linears(reference)
    for name, linear in prunable_linears(ours).items():
        assert torch.equal(matrix(linear.module) == 0, matrix(theirs[name].module) == 0), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_default_budget_follows_the_layer_and_keeps_the_reference_masks(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sequential, "RANK_ELEMENTS", 200)  # rows ranked a few at a time
    ids = calibration_ids()
    ours = BUILD[arch]().double()
    reference = copy.deepcopy(ours)
    wide = copy.deepcopy(ours)
    shared = copy.deepcopy(ours)
    forwards: list[int] = []

    def observe(index: int, layer: Any, inputs: LayerInputs | None) -> None:
        assert inputs is not None
        forwards.append(len(inputs.calls))

    ratios = {name: 0.5 for name in prunable_linears(ours)}
    # The floor: a tiny model's calibration runs as one forward, not one per sample.
    prune_causal_lm(ours, ratios, criterion="wanda", input_ids=ids, on_layer=observe)
    assert forwards == [1, 1]
    forwards.clear()
    # Without the floor, a fifth of a tiny layer's weights is below one sample's working set.
    monkeypatch.setattr(sequential, "CALIBRATION_FLOOR", 0)
    prune_causal_lm(shared, ratios, criterion="wanda", input_ids=ids, on_layer=observe)
    assert forwards == [8, 8]
    forwards.clear()
    prune_causal_lm(
        wide, ratios, criterion="wanda", input_ids=ids, memory_budget=2**30, on_layer=observe
    )
    assert forwards == [1, 1]  # an explicit budget still decides
    _reference_prune(reference, ids, "wanda", 0.5)

    theirs = prunable_linears(reference)
    for other in (ours, shared, wide):
        for name, linear in prunable_linears(other).items():
            assert torch.equal(matrix(linear.module) == 0, matrix(theirs[name].module) == 0), name


@pytest.mark.parametrize("n_m", [None, (2, 4)])
@pytest.mark.parametrize("width", [96, 97])  # odd: the middle row of the reversed factorisation
def test_sparsegpt_factors_the_hessian_in_its_own_buffer(
    n_m: tuple[int, int] | None, width: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(width, 500)
    x[5] = 0.0  # an input that is always zero
    xxt = x @ x.T
    w = torch.randn(24, width)
    damped = xxt.clone()
    damped[5, 5] = 1.0
    damped.diagonal().add_(DAMPING * damped.diagonal().mean())
    plain = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)

    buffer = UpperPanels.from_lower(xxt)
    hinv = inverse_hessian_(buffer)
    assert hinv.u.flat.data_ptr() == buffer.flat.data_ptr()  # no second Hessian-sized buffer
    torch.testing.assert_close(hinv.u.dense(), plain, rtol=1e-4, atol=1e-6)
    pruned = w.clone()
    swept = sweep(pruned, hinv, 0.5, n_m=n_m)
    torch.testing.assert_close(pruned, sparsegpt(w, xxt, 0.5, n_m=n_m))
    assert int((pruned == 0).sum()) == planned_removals((24, width), 0.5, n_m, block=128)
    # The error the sweep reports is the error on the data, undampened.
    direct = float(((w - pruned).double() @ x.double()).square().sum())
    assert error_on_data(w, pruned, hinv, swept) == pytest.approx(direct, rel=1e-3)
    assert reconstruction_error(w, pruned, xxt) == pytest.approx(direct, rel=1e-3)
    # Given only a lower triangle, both read nothing else.
    lower = xxt.clone()
    upper = torch.triu_indices(width, width, 1)
    lower[upper[0], upper[1]] = float("nan")
    assert reconstruction_error(w, pruned, lower) == pytest.approx(direct, rel=1e-3)
    torch.testing.assert_close(sparsegpt(w, lower, 0.5, n_m=n_m), pruned)


@pytest.mark.parametrize("panel", [128, 16, 7])
def test_the_gram_update_fills_the_upper_panels(panel: int) -> None:
    """``x^T x`` added panel by panel, in place, equals the full product on and above the
    diagonal (to float32 rounding), in about half the square's bytes."""
    torch.manual_seed(0)
    x = torch.randn(300, 40)
    start = torch.randn(40, 40)
    start = start @ start.T
    buffer = UpperPanels.from_lower(start, panel)
    pointer = buffer.flat.data_ptr()
    buffer.add_gram_(x)
    buffer.add_gram_(x[:7])
    want = start.double() + x.double().T @ x.double() + x[:7].double().T @ x[:7].double()
    assert buffer.flat.data_ptr() == pointer
    torch.testing.assert_close(buffer.dense().double(), want.triu(), rtol=1e-5, atol=1e-3)
    # A 5,632-input down_proj's Hessian in the service's panels: 51% of the square.
    assert UpperPanels.numel(5632) / 5632**2 < 0.52


@pytest.mark.parametrize(("n", "panel"), [(33, 7), (33, 16), (97, 16), (257, 128)])
def test_the_panel_factor_is_the_cholesky_factor_of_the_inverse(n: int, panel: int) -> None:
    """Factored in place, panel by panel, the Hessian becomes the upper Cholesky factor of its
    inverse, reading the upper triangle only (the diagonal blocks' lower halves are NaN here);
    rows of it across panels read as the dense factor's."""
    torch.manual_seed(0)
    x = torch.randn(n, 4 * n)
    h = x @ x.T + torch.eye(n)
    plain = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True
    )
    buffer = UpperPanels.from_lower(h, panel)
    for block in buffer.diagonal_blocks():
        rows = block.shape[0]
        below = torch.tril_indices(rows, rows, -1)
        block[below[0], below[1]] = float("nan")
    invert_factor_(buffer)
    factor = buffer.dense()
    torch.testing.assert_close(factor.double(), plain, rtol=1e-4, atol=1e-5)
    for a, b in [(0, min(panel, n)), (panel, min(2 * panel, n)), (3, n - 2), (panel - 1, n)]:
        torch.testing.assert_close(buffer.rows(a, b), factor[a:b, a:])


def _column_by_column(
    w: torch.Tensor, u: torch.Tensor, s: float, n_m: tuple[int, int] | None
) -> torch.Tensor:
    """The OBS sweep in its plainest form: each column pruned, then its error spread over every
    later column at once (no lazy blocks); masks per 128 columns (or per run of m) chosen on the
    weights as updated so far, weights already zero first."""
    w = w.clone()
    cols = w.shape[1]
    frozen = w == 0
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    for j in range(cols):
        if n_m is None and j % 128 == 0:
            block = slice(j, min(j + 128, cols))
            score = (w[:, block] ** 2 / u.diagonal()[block] ** 2).masked_fill(frozen[:, block], -1)
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[score.flatten().argsort()[: removal_count(s, score.numel())]] = True
            mask[:, block] = flat.reshape(score.shape) | frozen[:, block]
        if n_m is not None and j % n_m[1] == 0:
            run = slice(j, min(j + n_m[1], cols))
            score = (w[:, run] ** 2 / u.diagonal()[run] ** 2).masked_fill(frozen[:, run], -1)
            mask[:, run] = True
            mask[:, run].scatter_(1, score.argsort(dim=1, descending=True)[:, : n_m[0]], False)
        err = w[:, j] * mask[:, j] / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
        w[:, j] *= ~mask[:, j]
    return w


@pytest.mark.parametrize("n_m", [None, (2, 4), (1, 3)])
def test_the_blocked_sweep_is_the_column_by_column_sweep(n_m: tuple[int, int] | None) -> None:
    """Runs of columns, products for the rest of each block and the transposed layout change
    the order of float32 sums only: same masks, weights equal up to rounding (300 columns: two
    blocks of 128 and a short one, runs that do not divide it; with m = 3 blocks of 126, whose
    rows of the factor straddle its panels of 128)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 2000, generator=generator) * torch.rand(300, 1, generator=generator)
    w = torch.randn(40, 300, generator=generator)
    w[w.abs() < 0.05] = 0.0  # zeros held from an earlier round
    hinv = inverse_hessian_(UpperPanels.from_lower(x @ x.T))
    ours = w.clone()
    torch.set_num_threads(2)  # the sweep runs on one thread and gives the caller's count back
    sweep(ours, hinv, 0.5, n_m=n_m)
    assert torch.get_num_threads() == 2
    plain = _column_by_column(w.double(), hinv.u.dense().double(), 0.5, n_m)
    assert torch.equal(ours == 0, plain == 0)
    torch.testing.assert_close(ours.double(), plain, rtol=1e-4, atol=1e-4)


def test_the_grouping_batchs_inputs_are_not_held_through_the_hessian_pass() -> None:
    """The first batch's inputs, kept from grouping the linears, are added to the Hessians and
    let go before the pass runs the other batches: none is alive in their forwards (at the 1 B
    widths they were 24 MiB on top of the pass's peak)."""
    model = tiny_llama()
    layer = decoder_layers(model)[0]
    inputs = capture_inputs(model, layer.module, calibration_ids(), batch_size=3)
    probe = sequential._probe(layer, list(layer.linears), inputs)
    groups, first = probe.groups, dict(probe.first)
    del probe
    held = [weakref.ref(x) for x in first.values()]
    assert len(held) == 4
    assert all(ref() is not None for ref in held)
    alive: list[int] = []
    handle = layer.module.register_forward_pre_hook(
        lambda *_: alive.append(sum(ref() is not None for ref in held))
    )
    try:
        hessians = sequential._collect_hessians(layer, groups, inputs, first)
    finally:
        handle.remove()
    assert alive == [0, 0]  # the second and third batches; the first came from the probe
    assert all(hessian.tokens == 8 * 32 for hessian in hessians)


def test_each_group_is_calibrated_up_to_its_first_linear_only() -> None:
    """Collecting a group's ``X X^T`` stops each forward where the group's first linear is called:
    the same Hessian as a full forward gives, without running the layer past it."""
    model = tiny_llama()
    layer = decoder_layers(model)[0]
    inputs = capture_inputs(model, layer.module, calibration_ids(), batch_size=3)
    groups = sequential.input_groups(layer, list(layer.linears), inputs)
    assert [[lin.name.split(".")[-1] for lin in g.linears] for g in groups] == [
        ["q_proj", "k_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    ]
    assert all(group.called_once for group in groups)
    down = layer.module.mlp.down_proj
    calls: list[int] = []
    counter = down.register_forward_pre_hook(lambda *_: calls.append(1))
    for group in groups:
        calls.clear()
        (stopped,) = sequential._collect_hessians(layer, [group], inputs)
        reached = len(calls)
        full = Hessian(group.linears[0].shape[1], torch.device("cpu"))
        handle = group.linears[0].module.register_forward_hook(full)
        try:
            inputs.run(layer.module)
        finally:
            handle.remove()
        assert torch.equal(stopped.xxt.flat, full.xxt.flat)
        assert stopped.tokens == full.tokens == 8 * 32
        # down_proj is called last: only its own group's forwards reach it, stopping there.
        assert reached == (len(inputs.calls) if group is groups[-1] else 0)
    counter.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hessians_that_fit_the_budget_are_collected_in_one_pass(arch: str) -> None:
    """Consecutive groups whose Hessians fit in ``memory_budget`` together are collected in one
    pass, and the first pass takes the grouping forward's batch too: per layer two passes over
    the samples when all fit, three when all but the MLP's output projection do, five one at a
    time; and the same Hessians, so the same pruned weights, every way."""
    ids = calibration_ids()
    hidden = prunable_linears(BUILD[arch]())
    width = min(lin.shape[1] for lin in hidden.values())
    # The three groups that read the hidden width (q/k/v, o, the MLP's input) fit; the MLP's
    # output projection, which reads the wider intermediate, does not.
    mixed = 3 * UpperPanels.numel(width) * 4
    assert UpperPanels.numel(max(lin.shape[1] for lin in hidden.values())) * 4 > mixed
    models = {budget: BUILD[arch]() for budget in (1, mixed, 2**30)}
    passes: dict[int, list[int]] = {}
    for budget, model in models.items():
        counts = passes.setdefault(budget, [])
        for block in _blocks(model):
            block.register_forward_pre_hook(lambda *_, c=counts: c.append(1))
        ratios = {name: 0.5 for name in prunable_linears(model)}
        results = prune_causal_lm(
            model,
            ratios,
            criterion="sparsegpt",
            input_ids=ids,
            batch_size=3,
            memory_budget=budget,
        )
        assert all(r.error is not None and r.error > 0 for r in results.values())
    layers, batches = len(_blocks(models[1])), 3  # 8 samples: 3 + 3 + 2
    # Capturing the first layer's inputs stops at its call, once per batch. Then per layer, one
    # at a time: the grouping batch, the first group's other batches, three groups' passes and
    # the outputs (but the last layer's); in two runs, one pass less than the runs; together:
    # the grouping batch and the others.
    fixed = batches + (layers - 1) * batches
    assert sum(passes[1]) == fixed + layers * (1 + (batches - 1) + 3 * batches)
    assert sum(passes[mixed]) == fixed + layers * (1 + (batches - 1) + batches)
    assert sum(passes[2**30]) == fixed + layers * batches
    one = prunable_linears(models[1])
    for budget in (mixed, 2**30):
        other = prunable_linears(models[budget])
        for name, linear in one.items():
            assert torch.equal(linear.module.weight, other[name].module.weight), (budget, name)


@pytest.mark.parametrize(("dtype", "runs"), [(torch.float32, 1), (torch.bfloat16, 2)])
def test_the_default_allowance_collects_a_llama_layers_hessians_in_one_pass(
    dtype: torch.dtype, runs: int
) -> None:
    """At the 1 B widths (hidden 2,048, MLP 5,632; built on the meta device, no weights) the four
    Hessians of a float32 Llama layer (88 MiB) fit the default allowance together, though the
    MLP's output projection's alone (62 MiB) is above the forward's default budget (34 MiB);
    with bfloat16 weights, whose Hessians are still float32, that one takes a pass alone."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=4,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    layer = decoder_layers(model)[0]
    by_name = {lin.name.split(".")[-1]: lin for lin in layer.linears}
    groups = [
        sequential.InputGroup([by_name[name] for name in names], called_once=True)
        for names in (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"])
    ] + [sequential.InputGroup([by_name["down_proj"]], called_once=True)]
    hessians = sum(group.hessian_bytes for group in groups)
    assert 85 * 2**20 < hessians < 90 * 2**20
    assert sequential.default_memory_budget(layer) < groups[-1].hessian_bytes < hessians
    rounds = sequential._rounds_last_first(groups, sequential.default_hessian_budget(layer))
    assert len(rounds) == runs
    assert [group for run in reversed(rounds) for group in run] == groups


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.99, 1.0])
def test_row_masks_remove_what_a_stable_sort_ranks_lowest(sparsity: float) -> None:
    """Magnitude's and Wanda's row masks come from a selection, not a sort: the same positions as
    the first ``k`` of a stable ascending sort of each row, on rows with many equal scores, with
    already-zero weights ranked at -1, and with NaN, in rows of a few columns to 700."""
    generator = torch.Generator().manual_seed(0)
    ties = torch.randn(300, 33, generator=generator)
    ties[torch.rand(300, 33, generator=generator) < 0.6] = -1.0
    nan = torch.randn(50, 40, generator=generator)
    nan[3, 5] = nan[7, 0] = float("nan")
    nan[9] = float("nan")
    for scores in (
        torch.rand(3000, 700, generator=generator),
        torch.randint(0, 5, (500, 64), generator=generator).float(),
        ties,
        nan,
    ):
        k = removal_count(sparsity, scores.shape[1])
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        expected = torch.ones_like(scores, dtype=torch.bool).scatter_(1, lowest, False)
        assert torch.equal(row_mask(scores, sparsity), expected)


@pytest.mark.parametrize("share", [0.0001, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32])
def test_kth_lowest_selects_what_kthvalue_does(share: float, dtype: torch.dtype) -> None:
    """Thresholds of SparseGPT's blocks (one long row), of Wanda's and magnitude's rows and of
    global ranking (int32 magnitude keys among them): the value ``torch.kthvalue`` selects, on
    plain scores, scores with -1 for held zeros, many ties, and NaN (ranked highest); bfloat16
    has no numpy type and goes through torch."""
    generator = torch.Generator().manual_seed(0)
    plain = torch.rand(64, 700, generator=generator)
    frozen = plain.clone()
    frozen[torch.rand(64, 700, generator=generator) < 0.3] = -1.0
    ties = torch.randint(0, 20, (64, 700), generator=generator).float()
    nan = plain.clone()
    nan[torch.rand(64, 700, generator=generator) < 0.05] = float("nan")
    integer = not dtype.is_floating_point
    for values in (plain, frozen, ties) if integer else (plain, frozen, ties, nan):
        typed = (values * 1000).to(dtype) if integer else values.to(dtype)
        for shaped in (typed, typed.flatten()):
            k = max(1, round(share * shaped.shape[-1]))
            expected = torch.kthvalue(shaped, k, dim=-1, keepdim=True).values
            got = kth_lowest(shaped, k)
            assert got.dtype == expected.dtype
            assert torch.equal(got.isnan(), expected.isnan())
            assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_wanda_removes_held_zeros_before_live_weights_that_score_zero() -> None:
    """A weight already zero ranks below every other weight, also below a live weight whose
    score is 0 because its input feature never fired: each row ends with exactly the asked
    share of zeros, where ranking both at 0 would remove the earlier live ones too."""
    generator = torch.Generator().manual_seed(0)
    module = nn.Linear(40, 6, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.rand(6, 40, generator=generator) + 1.0)
        module.weight[:, 30:] = 0.0  # held from an earlier round
    norms = FeatureNorms(40, torch.device("cpu"))
    norms.sum_sq = torch.rand(40, dtype=torch.float64, generator=generator) + 0.5
    norms.sum_sq[:15] = 0.0  # features that never fired
    sequential._wanda(Linear("mlp.down_proj", module, False), norms, 0.5, None)
    zeros = (module.weight == 0).sum(dim=1)
    assert zeros.tolist() == [20] * 6
    assert bool((module.weight[:, 30:] == 0).all())


def test_wanda_feature_norms_are_the_float64_sum_of_squares() -> None:
    """``||X_j||^2`` over batches of float32 and bfloat16 activations, one batch longer than a
    chunk, features from tiny to large and some far from zero mean: within 4e-7 of the float64
    sum of squares (1e-7 here; ``vector_norm(dim=0) ** 2``, used before, was 1e-6 off)."""
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(2048, generator=generator) ** 4 * 30
    batches = [torch.randn(1, n, 2048, generator=generator) * scale for n in (512, 1500, 77)]
    for batch in batches:
        batch[..., :16] += 50.0
    batches.append(batches[-1].to(torch.bfloat16))
    norms = FeatureNorms(2048, torch.device("cpu"))
    for batch in batches:
        norms(nn.Identity(), (batch,), None)
    expected = sum(b.double().reshape(-1, 2048).square().sum(dim=0) for b in batches)
    assert isinstance(expected, torch.Tensor)
    assert norms.tokens == sum(b.shape[1] for b in batches)
    assert float(((norms.sum_sq - expected).abs() / expected).max()) < 4e-7


@pytest.mark.parametrize("subset", ["all", "attention"])
def test_wanda_statistics_stop_at_the_last_linear_after_the_first_batch(
    subset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first batch, Wanda's pass ends at the input of the last target linear the layer
    calls: the same statistics as full forwards, and nothing after that linear runs again. The
    linears that read one tensor share its norms: computed once per distinct input (q/k/v,
    o, gate/up, down), the same values as each linear's own."""
    terms = FeatureNorms.terms
    computed: list[int] = []

    def counted(x: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        computed.append(1)
        return terms(x)

    model = tiny_llama()
    layer = decoder_layers(model)[0]
    inputs = capture_inputs(model, layer.module, calibration_ids(), batch_size=3)
    targets = [
        lin for lin in layer.linears if subset == "all" or lin.name.split(".")[-2] == "self_attn"
    ]
    last = targets[-1].module  # down_proj, or o_proj for the attention subset
    finished: list[int] = []
    counter = last.register_forward_hook(lambda *_: finished.append(1))
    monkeypatch.setattr(FeatureNorms, "terms", staticmethod(counted))
    stopped = sequential._collect_norms(layer, targets, inputs)
    monkeypatch.undo()
    counter.remove()
    assert len(inputs.calls) == 3
    assert len(finished) == 1  # the first batch only
    assert len(computed) == 3 * (4 if subset == "all" else 2)
    full = {lin.name: FeatureNorms(lin.shape[1], torch.device("cpu")) for lin in targets}
    handles = [lin.module.register_forward_hook(full[lin.name]) for lin in targets]
    try:
        inputs.run(layer.module)
    finally:
        for handle in handles:
            handle.remove()
    for lin in targets:
        assert torch.equal(stopped[lin.name].sum_sq, full[lin.name].sum_sq), lin.name
        assert stopped[lin.name].tokens == full[lin.name].tokens == 8 * 32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsegpt_reconstructs_as_well_as_a_plain_reference(arch: str) -> None:
    ids = calibration_ids(16, 32)
    ours = BUILD[arch]()
    reference = copy.deepcopy(ours)
    spec = PruningSpec(criterion="sparsegpt", granularity="unstructured", sparsity=0.5)

    outcome = prune(ours, spec, ids)
    theirs = _reference_prune(reference, ids, "sparsegpt", 0.5)

    mine = list(outcome.details["reconstruction_error"].values())
    assert len(mine) == len(theirs)
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    print(f"{arch}: ours/reference error per linear", [f"{r:.3f}" for r in ratios])
    # Every group calibrated on the layer as it came, as the reference does: the same error up
    # to float32 against float64.
    assert all(0.99 < r < 1.01 for r in ratios), ratios
    # And both beat pruning the same weights without the OBS updates (Wanda at 50%).
    wanda = BUILD[arch]()
    wanda_errors = []
    for block in _blocks(wanda):
        for module, x in _linear_inputs(wanda, block, ids).values():
            w = matrix(module).double()
            kept = w.clone()
            score = w.abs() * x.square().sum(0).sqrt()
            kept.scatter_(1, score.argsort(dim=1)[:, : removal_count(0.5, w.shape[1])], 0.0)
            wanda_errors.append(float(((w - kept) @ x.t()).square().sum()) / x.shape[0])
            with torch.no_grad():
                module.weight.copy_(kept if isinstance(module, nn.Linear) else kept.t())
    assert sum(mine) < sum(wanda_errors)


def test_true_sequential_calibrates_each_group_on_the_groups_pruned_before_it() -> None:
    ids = calibration_ids(16, 32)
    models = {mode: tiny_llama() for mode in (False, True)}
    for mode, model in models.items():
        ratios = {name: 0.5 for name in prunable_linears(model)}
        prune_causal_lm(model, ratios, criterion="sparsegpt", input_ids=ids, true_sequential=mode)
    plain, chained = (prunable_linears(models[mode]) for mode in (False, True))
    first = {"q_proj", "k_proj", "v_proj"}
    for name, linear in plain.items():
        same = torch.equal(linear.module.weight, chained[name].module.weight)
        # The first group of the first layer reads the same input either way; every later
        # group reads a pruned group's output under true_sequential.
        assert same == (name.startswith("model.layers.0.") and name.split(".")[-1] in first), name


# -- a trained model ------------------------------------------------------------------------------


def _stdlib_bytes() -> torch.Tensor:
    import argparse
    import collections
    import dataclasses
    import json
    import textwrap

    text = "".join(
        inspect.getsource(m) for m in (argparse, collections, dataclasses, json, textwrap)
    )
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _perplexity(model: nn.Module, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=blocks, use_cache=False).logits[:, :-1]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)
        )
    return math.exp(float(loss))


@pytest.fixture(scope="module")
def trained() -> SimpleNamespace:
    """A byte-level Llama (2 layers, d 128) trained for 250 steps on stdlib source, once per
    module (about a minute on a loaded 2-core CPU), with its held-out and calibration blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = _stdlib_bytes()
    seq = 64
    blocks = data[: data.numel() // seq * seq].reshape(-1, seq)
    generator = torch.Generator().manual_seed(0)
    blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
    held_out, calibration, train = blocks[:48], blocks[48:80], blocks[80:]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _step in range(250):
        batch = train[torch.randint(0, train.shape[0], (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    return SimpleNamespace(model=model, held_out=held_out, calibration=calibration, seconds=seconds)


SETTINGS = {"70%": (0.7, None), "2:4": (0.5, (2, 4))}
# Outlier features: log-normal per-feature scales of this spread. Measured on the trained model
# over scale seeds 0-2 (seed 0 is what runs here), transformers 5.25, on the CI machine of
# 2026-12-05: Wanda / magnitude perplexity 0.909, 0.889, 0.909 at 70% and 0.984, 0.928, 0.944 at
# 2:4; SparseGPT / Wanda 0.881, 0.880, 0.868 at 70% and 0.952, 0.954, 0.951 at 2:4. At spread 0.5
# (used until then) the same seeds gave Wanda / magnitude 0.983-0.944 at 70% and 1.001, 0.973,
# 0.963 at 2:4 there, where an earlier machine's float rounding had trained a model with 0.99 at
# seed 0: too close to 1 to order. Without the scales Wanda / magnitude is about 1 (no order); at
# spread 1.0 SparseGPT's dampening (1% of the mean diagonal) swamps the small features and it
# falls behind Wanda.
SIGMA = 0.7
# On an AMD EPYC CI machine (AVX2 only) of 2026-12-06, the model trained there gave, over the
# same seeds: Wanda / magnitude 0.879, 0.816, 0.816 at 70% and 0.957, 0.982, 0.955 at 2:4;
# SparseGPT / Wanda 0.963, 0.968, 0.956 at 70% and 0.981, 0.980, 0.977 at 2:4. The CPU that
# trains the model moves these ratios by up to 0.09, so the bounds are loose:
# (Wanda / magnitude, SparseGPT / Wanda) must be below these: at 70% SparseGPT at least 1% ahead
# of Wanda (ten times the perplexity noise between implementations of one criterion) and Wanda
# 5% ahead of magnitude; at 2:4, where the gaps are 2-7%, only the strict order.
SLACK = {"70%": (0.95, 0.99), "2:4": (1.0, 1.0)}


def _pruned_perplexity(model: nn.Module, criterion: str, setting: str, trained: Any) -> float:
    sparsity, n_m = SETTINGS[setting]
    pruned = copy.deepcopy(model)
    ratios = dict.fromkeys(prunable_linears(pruned), sparsity)
    prune_causal_lm(pruned, ratios, criterion=criterion, n_m=n_m, input_ids=trained.calibration)
    return _perplexity(pruned, trained.held_out)


def test_on_a_trained_model_sparsegpt_reconstructs_best_at_70(trained: Any) -> None:
    """SparseGPT must beat both others clearly. Wanda vs magnitude is printed, not asserted here:
    at this size (no outlier features yet) they land within a few % of each other either way
    (NOTES fact 8 separates them on a 4-layer, d 256, 4k-BPE model, too slow for a unit test;
    the next test gives this model outlier features)."""
    dense = _perplexity(trained.model, trained.held_out)
    results = {
        criterion: _pruned_perplexity(trained.model, criterion, "70%", trained)
        for criterion in ("magnitude", "wanda", "sparsegpt")
    }
    print(
        f"dense {dense:.2f}, 70%: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()),
        f"(trained in {trained.seconds:.0f} s)",
    )
    assert dense < results["sparsegpt"]
    assert results["sparsegpt"] < 0.95 * min(results["wanda"], results["magnitude"])


@torch.no_grad()
def _outlier_features(model: LlamaForCausalLM, sigma: float, seed: int) -> LlamaForCausalLM:
    """The same function with log-normal per-feature scales on every linear's input, as trained
    LLMs have (a few features orders of magnitude larger than the rest): each norm's gain, each
    ``v_proj`` and ``up_proj`` output row is multiplied by a scale and the matching input column
    of the linears that read it divided by it. Outputs are unchanged (up to rounding); weight
    magnitudes are not, which is what Wanda's |W|·||X|| corrects and plain |W| does not."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)

    def scales(n: int) -> torch.Tensor:
        return torch.exp(sigma * torch.randn(n, generator=generator))

    for layer in out.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        s = scales(attn.q_proj.in_features)
        layer.input_layernorm.weight.mul_(s)
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
            linear.weight.div_(s)
        s = scales(mlp.gate_proj.in_features)
        layer.post_attention_layernorm.weight.mul_(s)
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight.div_(s)
        s = scales(attn.v_proj.out_features)  # o_proj reads each value channel once per query head
        attn.v_proj.weight.mul_(s[:, None])
        group = attn.o_proj.in_features // attn.v_proj.out_features
        per_query = s.reshape(-1, attn.head_dim).repeat_interleave(group, dim=0).reshape(-1)
        attn.o_proj.weight.div_(per_query)
        s = scales(mlp.up_proj.out_features)
        mlp.up_proj.weight.mul_(s[:, None])
        mlp.down_proj.weight.div_(s)
    return out


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_with_outlier_features_sparsegpt_beats_wanda_beats_magnitude(
    trained: Any, setting: str
) -> None:
    """The issue's order, SparseGPT < Wanda < magnitude, on the trained model given outlier
    features (see ``_outlier_features``): the slack is the smallest margin measured over seeds."""
    model = _outlier_features(trained.model, sigma=SIGMA, seed=0)
    dense = _perplexity(trained.model, trained.held_out)
    assert _perplexity(model, trained.held_out) == pytest.approx(dense, rel=1e-3)
    results = {
        criterion: _pruned_perplexity(model, criterion, setting, trained)
        for criterion in ("magnitude", "wanda", "sparsegpt")
    }
    print(setting, {k: round(v, 2) for k, v in results.items()})
    # Wanda's |W_ij| * ||X_j|| does not see the rescaling at all: the same masks, the same model.
    plain = _pruned_perplexity(trained.model, "wanda", setting, trained)
    assert results["wanda"] == pytest.approx(plain, rel=1e-3)
    wanda_slack, sparsegpt_slack = SLACK[setting]
    assert results["wanda"] < wanda_slack * results["magnitude"]
    assert results["sparsegpt"] < sparsegpt_slack * results["wanda"]


def test_perplexity_within_the_issues_factor_of_plain_references(trained: Any) -> None:
    """At 70% on the trained model: magnitude and Wanda within 1.02x the perplexity of the plain
    per-layer references above, SparseGPT within 1.03x (the issue's factors)."""
    for criterion, factor in (("magnitude", 1.02), ("wanda", 1.02), ("sparsegpt", 1.03)):
        ours = _pruned_perplexity(trained.model, criterion, "70%", trained)
        reference = copy.deepcopy(trained.model)
        _reference_prune(reference, trained.calibration, criterion, 0.7)
        theirs = _perplexity(reference, trained.held_out)
        print(f"{criterion}: ours {ours:.3f}, reference {theirs:.3f}")
        assert ours <= factor * theirs
