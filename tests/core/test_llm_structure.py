"""Width and depth pruning of Hugging Face causal LMs: the model really gets smaller, stock
transformers loads it from its rewritten config, and the right units are removed."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import InvalidSpec
from core.formats import get_format
from core.pruning import PruneContext, preflight, pruner_for
from core.spec import PruningSpec
from tests.hf_factories import archive_folder, save_checkpoint

IDS = torch.randint(0, 290, (4, 24), generator=torch.Generator().manual_seed(1))


def _width(criterion: str = "activation", **fractions: float) -> PruningSpec:
    return PruningSpec(criterion=criterion, granularity="width", width=fractions)


def _depth(k: int, criterion: str = "activation") -> PruningSpec:
    return PruningSpec(criterion=criterion, granularity="depth", depth={"layers": k})


def _load(tmp_path: Path, arch: str = "llama") -> tuple[Any, Any]:
    _, folder = save_checkpoint(arch, tmp_path / "src")
    return get_format("hf").load(archive_folder(folder, tmp_path / "model.tar"))


def _prune(model: Any, info: Any, spec: PruningSpec, dry_run: bool = False) -> Any:
    return pruner_for("hf", spec.granularity).prune(
        model, info, spec, PruneContext(calibration=(IDS,), dry_run=dry_run)
    )


def _reload_stock(model: Any, tmp_path: Path) -> Any:
    """Save through the format, unpack the tar and load with stock transformers."""
    from transformers import AutoModelForCausalLM

    written = get_format("hf").save(model, tmp_path / "out")
    folder = tmp_path / "unpacked"
    with tarfile.open(written["model"]) as tar:
        tar.extractall(folder, filter="data")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()


def _check_reload(model: Any, tmp_path: Path) -> Any:
    stock = _reload_stock(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=IDS).logits, model.model(input_ids=IDS).logits)
    out = stock.generate(IDS[:1, :6], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    return stock


@pytest.mark.parametrize("criterion", ["activation", "magnitude", "random"])
def test_width_mlp_halves_intermediate_size(criterion: str, tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    outcome = _prune(model, info, _width(criterion, mlp=0.5))
    stock = _check_reload(model, tmp_path)
    assert stock.config.intermediate_size == 32
    for layer in stock.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (32, 32)
        assert layer.mlp.down_proj.weight.shape == (32, 32)
    assert outcome.params_after == get_format("hf").count_parameters(model)
    assert all(len(kept) == 32 for kept in outcome.details["kept_mlp"].values())
    shapes = {layer.name: layer.shape_after for layer in outcome.layers}
    assert shapes["model.layers.0.mlp.up_proj"] == (32, 32)
    assert shapes["model.layers.1.self_attn.q_proj"] == (32, 32)


def test_width_heads_removes_whole_kv_groups(tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    outcome = _prune(model, info, _width(heads=0.5))
    stock = _check_reload(model, tmp_path)
    config = stock.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    attn = stock.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32)
    assert attn.k_proj.weight.shape == (8, 32)
    assert attn.o_proj.weight.shape == (32, 16)
    assert all(len(kept) == 1 for kept in outcome.details["kept_kv_groups"].values())


def test_depth_removes_the_least_changing_layer(tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    outcome = _prune(model, info, _depth(1))
    stock = _check_reload(model, tmp_path)
    assert stock.config.num_hidden_layers == 1
    assert len(stock.model.layers) == 1
    scores = outcome.details["layer_scores"]
    assert outcome.details["removed_layers"] == [min(scores, key=scores.get)]
    removed = outcome.details["removed_layers"][0]
    for layer in outcome.layers:
        gone = layer.name.startswith(removed + ".")
        assert (layer.shape_after == (0, 0)) == gone
        assert (layer.params == 0) == gone
    assert stock.model.layers[0].self_attn.layer_idx == 0


def _masked_reference(original: torch.nn.Module, details: dict[str, Any], heads: bool) -> None:
    """Zero, in the unpruned ``original``, what the pruner removed."""
    with torch.no_grad():
        for index, layer in enumerate(original.model.layers):
            name = f"model.layers.{index}"
            if heads:
                kept = details["kept_kv_groups"][name]
                o = layer.self_attn.o_proj.weight  # 4 heads of 8, 2 per kv group
                for group in range(2):
                    if group not in kept:
                        o[:, group * 16 : (group + 1) * 16] = 0
            else:
                kept = details["kept_mlp"][name]
                down = layer.mlp.down_proj.weight
                drop = [j for j in range(down.shape[1]) if j not in kept]
                down[:, drop] = 0


@pytest.mark.parametrize("heads", [False, True], ids=["mlp", "heads"])
def test_pruned_model_computes_the_original_with_removed_units_zeroed(
    heads: bool, tmp_path: Path
) -> None:
    model, info = _load(tmp_path)
    original = copy.deepcopy(model.model)
    spec = _width(heads=0.5) if heads else _width(mlp=0.5)
    outcome = _prune(model, info, spec)
    _masked_reference(original, outcome.details, heads)
    with torch.no_grad():
        torch.testing.assert_close(
            model.model(input_ids=IDS).logits, original(input_ids=IDS).logits
        )


def test_activation_keeps_the_most_active_neurons(tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    original = copy.deepcopy(model.model)
    sums = [torch.zeros(64, dtype=torch.float64) for _ in original.model.layers]

    def hook(index: int):
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sums[index] += args[0].reshape(-1, 64).abs().sum(0).double()

        return record

    for index, layer in enumerate(original.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(hook(index))
    with torch.no_grad():
        original(input_ids=IDS)  # layer 0 sees the same input before and after
    outcome = _prune(model, info, _width(mlp=0.5))
    kept = outcome.details["kept_mlp"]["model.layers.0"]
    assert kept == sorted(sums[0].argsort(descending=True)[:32].tolist())


def test_dry_run_predicts_and_touches_nothing(tmp_path: Path) -> None:
    specs = (_width(mlp=0.5, heads=0.5), _width(hidden=0.25, mlp=0.25), _depth(1))
    for index, spec in enumerate(specs):
        model, info = _load(tmp_path / str(index))
        before = {n: p.clone() for n, p in model.model.named_parameters()}
        outcome = _prune(model, info, spec, dry_run=True)
        after = dict(model.model.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in before)
        real = _prune(model, info, spec)
        assert outcome.params_after == real.params_after
        assert [lr.shape_after for lr in outcome.layers] == [lr.shape_after for lr in real.layers]


def test_depth_works_on_gpt2(tmp_path: Path) -> None:
    model, info = _load(tmp_path, "gpt2")
    outcome = _prune(model, info, _depth(1, "random"))
    assert model.model.config.n_layer == 1
    _check_reload(model, tmp_path)
    assert len(outcome.details["removed_layers"]) == 1


@pytest.mark.parametrize("criterion", ["activation", "magnitude", "taylor"])
def test_gpt2_width_removes_mlp_neurons(criterion: str, tmp_path: Path) -> None:
    """GPT-2's Conv1D MLP (c_fc (n_embd, n_inner), c_proj (n_inner, n_embd)) loses half its
    neurons: the count drops as predicted, stock transformers reloads n_inner = 64, the logits
    are the original model's with those neurons' c_proj rows zeroed, wte/lm_head stay tied."""
    model, info = _load(tmp_path, "gpt2")
    original = copy.deepcopy(model.model)
    before = get_format("hf").count_parameters(model)
    predicted = _prune(model, info, _width(criterion, mlp=0.5), dry_run=True)
    outcome = _prune(model, info, _width(criterion, mlp=0.5))
    # Per layer and neuron: a c_fc column and bias entry, a c_proj row (32 each).
    assert outcome.params_after == predicted.params_after == before - 2 * 64 * (32 + 1 + 32)
    assert outcome.details["layout"] == "gpt2"
    shapes = {layer.name: layer.shape_after for layer in outcome.layers}
    assert shapes == {layer.name: layer.shape_after for layer in predicted.layers}
    assert shapes["transformer.h.0.mlp.c_fc"] == (64, 32)
    assert shapes["transformer.h.1.mlp.c_proj"] == (32, 64)
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32)
    stock = _check_reload(model, tmp_path)
    assert stock.config.n_inner == 64
    mlp = stock.transformer.h[1].mlp
    assert (mlp.c_fc.weight.shape, mlp.c_fc.bias.shape) == ((32, 64), (64,))
    assert mlp.c_proj.weight.shape == (64, 32)
    assert stock.lm_head.weight.data_ptr() == stock.transformer.wte.weight.data_ptr()
    assert outcome.params_after == get_format("hf").count_parameters(stock)
    with torch.no_grad():
        for index, block in enumerate(original.transformer.h):
            kept = outcome.details["kept_mlp"][f"transformer.h.{index}"]
            assert len(kept) == 64
            drop = [j for j in range(128) if j not in kept]
            block.mlp.c_proj.weight[drop, :] = 0
        torch.testing.assert_close(
            stock(input_ids=IDS).logits, original(input_ids=IDS).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    ("fractions", "reason"),
    [({"heads": 0.5}, "no GPT2Config"), ({"mlp": 0.5, "hidden": 0.25}, "change every head")],
)
def test_gpt2_width_refuses_heads_and_hidden(
    fractions: dict[str, float], reason: str, tmp_path: Path
) -> None:
    model, info = _load(tmp_path, "gpt2")
    before = {n: p.clone() for n, p in model.model.named_parameters()}
    # From the layer names alone, as the API checks before queueing (422).
    names = {layer.name: layer.params for layer in info.prunable_layers}
    with pytest.raises(InvalidSpec, match=reason):
        preflight("hf", _width(**fractions), names)
    preflight("hf", _width(mlp=0.5), names)
    with pytest.raises(InvalidSpec, match=reason):
        _prune(model, info, _width(**fractions))
    after = dict(model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_width_and_depth_on_other_llama_layouts(arch: str, tmp_path: Path) -> None:
    model, info = _load(tmp_path, arch)
    _prune(model, info, _width(mlp=0.25, heads=0.5))
    _prune(model, info, _depth(1))
    stock = _check_reload(model, tmp_path)
    assert stock.config.num_hidden_layers == 1
    assert stock.config.intermediate_size == 48


def test_preflight_refuses_what_is_not_there() -> None:
    layers = {f"model.layers.{i}.mlp.down_proj": 10 for i in range(2)}
    with pytest.raises(InvalidSpec, match="at least one must stay"):
        preflight("hf", _depth(2), layers)
    with pytest.raises(InvalidSpec, match="one shot"):
        preflight(
            "hf",
            PruningSpec(
                criterion="magnitude",
                granularity="width",
                width={"mlp": 0.5},
                schedule={"kind": "iterative", "rounds": 2},
            ),
            layers,
        )
    # Weight magnitude has no meaning for a whole layer: the spec itself refuses it.
    with pytest.raises(ValueError, match="'magnitude' ranks single weights"):
        _depth(1, "magnitude")


def test_activation_needs_calibration(tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    with pytest.raises(InvalidSpec, match="needs calibration"):
        pruner_for("hf", "width").prune(model, info, _width(mlp=0.5), PruneContext())


@dataclasses.dataclass(frozen=True)
class TrainedLm:
    model: Any  # never changed by a test: copy it first
    held_out: torch.Tensor
    calibration: torch.Tensor
    train: torch.Tensor


@pytest.fixture(scope="module")
def trained_llama() -> TrainedLm:
    """The factory's tiny Llama trained 100 steps on stdlib source (its own BPE); 64-token
    blocks split into held-out, calibration and training sets."""
    import argparse
    import inspect
    import textwrap

    from tests.hf_factories import bpe_tokenizer, tiny_model

    text = "".join(inspect.getsource(m) for m in (argparse, dataclasses, textwrap))
    ids = torch.tensor(bpe_tokenizer().encode(text).ids, dtype=torch.long)
    seq = 64
    blocks = ids[: ids.numel() // seq * seq].reshape(-1, seq)
    generator = torch.Generator().manual_seed(0)
    blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
    held_out, calibration, train = blocks[:32], blocks[32:64], blocks[64:]
    model = tiny_model("llama")
    with torch.no_grad():  # a wider init makes the MLPs matter after a short training
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.normal_(0.0, 0.1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _step in range(100):
        batch = train[torch.randint(0, train.shape[0], (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return TrainedLm(model, held_out, calibration, train)


def _prune_trained(trained: TrainedLm, criterion: str, seed: int = 0) -> Any:
    """A copy of the trained model with half of every MLP removed by the registered pruner."""
    from core.formats.base import ModelInfo

    pruned = copy.deepcopy(trained.model)
    info = ModelInfo(format="hf", num_parameters=0, inputs=(), prunable_layers=())
    spec = PruningSpec(criterion=criterion, granularity="width", width={"mlp": 0.5}, seed=seed)
    pruner_for("hf", "width").prune(pruned, info, spec, PruneContext((trained.calibration,)))
    return pruned


def test_on_a_trained_model_activation_beats_random_at_half_the_mlp(
    trained_llama: TrainedLm,
) -> None:
    """Half of every MLP removed; perplexity straight after pruning on held-out blocks, no
    fine-tuning."""
    from core.lm_recovery import evaluate_perplexity

    start = time.perf_counter()
    held_out = trained_llama.held_out
    dense = evaluate_perplexity(trained_llama.model, held_out, device="cpu")["perplexity"]
    results: dict[str, float] = {}
    for criterion, seed in (
        ("activation", 0),
        ("magnitude", 0),
        *(("random", s) for s in range(3)),
    ):
        pruned = _prune_trained(trained_llama, criterion, seed)
        key = criterion if criterion != "random" else f"random{seed}"
        results[key] = evaluate_perplexity(pruned, held_out, device="cpu")["perplexity"]
    print(
        f"dense {dense:.2f}, mlp 0.5: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()),
        f"({time.perf_counter() - start:.0f} s)",
    )
    best_random = min(v for k, v in results.items() if k.startswith("random"))
    assert dense < results["activation"] < 0.98 * best_random


def test_distillation_lowers_perplexity_monotonically_with_its_budget(
    trained_llama: TrainedLm,
) -> None:
    """From one pruned start (half of every MLP, ``activation``), distillation from the dense
    model as a job runs it (``fine_tune_lm``, a frozen copy of the dense model as teacher, the
    same seed, data and settings) for 0, 10, 30 and 90 steps: held-out perplexity falls with
    every step up in budget. The same budget twice gives the same perplexity, so a fall is
    not run-to-run noise."""
    from core.lm_recovery import evaluate_perplexity, fine_tune_lm
    from core.spec import FineTuneSpec

    start = time.perf_counter()
    pruned = _prune_trained(trained_llama, "activation")
    teacher = copy.deepcopy(trained_llama.model).requires_grad_(False)

    def distilled(steps: int) -> float:
        student = copy.deepcopy(pruned)
        if steps:
            # Batch 32 and a short warm-up: AdamW's first full-size steps on small batches
            # moved this nearly-recovered student away from the teacher before towards it.
            spec = FineTuneSpec(
                steps=steps,
                batch_size=32,
                lr=1e-3,
                warmup_steps=5,
                loss="distillation",
                temperature=2.0,
            )
            fine_tune_lm(
                student, trained_llama.train, spec, masked=(), teacher=teacher, device="cpu"
            )
        return evaluate_perplexity(student, trained_llama.held_out, device="cpu")["perplexity"]

    dense = evaluate_perplexity(trained_llama.model, trained_llama.held_out, device="cpu")
    budgets = (0, 10, 30, 90)
    ppl = [distilled(steps) for steps in budgets]
    print(
        f"dense {dense['perplexity']:.4f}; distilled "
        + ", ".join(f"{b} steps {p:.4f}" for b, p in zip(budgets, ppl, strict=True)),
        f"({time.perf_counter() - start:.0f} s)",
    )
    assert distilled(budgets[1]) == ppl[1]
    # A fall of under 0.01% would be rounding, not learning (a learning rate near zero).
    assert all(later < earlier * (1 - 1e-4) for earlier, later in itertools.pairwise(ppl)), ppl


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_width_hidden_narrows_the_residual_stream(arch: str, tmp_path: Path) -> None:
    model, info = _load(tmp_path, arch)
    outcome = _prune(model, info, _width(hidden=0.25, mlp=0.5))
    stock = _check_reload(model, tmp_path)
    assert stock.config.hidden_size == 24
    assert stock.model.embed_tokens.weight.shape[1] == 24
    assert stock.model.layers[1].input_layernorm.weight.shape == (24,)
    assert stock.lm_head.weight.shape[1] == 24
    if arch == "qwen3":  # tied embeddings stay tied
        assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
        assert outcome.params_after == get_format("hf").count_parameters(stock)
    assert len(outcome.details["kept_hidden"]) == 24
    shapes = {layer.name: layer.shape_after for layer in outcome.layers}
    assert shapes["model.layers.0.self_attn.o_proj"][0] == 24
    assert shapes["model.layers.0.mlp.gate_proj"] == (32, 24)


def test_width_refuses_sizes_the_config_refuses(tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    before = {n: p.clone() for n, p in model.model.named_parameters()}
    with pytest.raises(InvalidSpec, match="multiple of the number of attention heads"):
        _prune(model, info, _width("magnitude", hidden=0.1))  # 29 channels, 4 heads
    after = dict(model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_taylor_prunes_every_width_part_and_depth(tmp_path: Path) -> None:
    model, info = _load(tmp_path)
    outcome = _prune(model, info, _width("taylor", mlp=0.5, heads=0.5, hidden=0.25))
    assert len(outcome.details["kept_hidden"]) == 24
    depth = _prune(model, info, _depth(1, "taylor"))
    assert len(depth.details["layer_scores"]) == 2
    stock = _check_reload(model, tmp_path)
    assert (stock.config.num_hidden_layers, stock.config.hidden_size) == (1, 24)
    assert all(p.grad is None for p in model.model.parameters())


def test_taylor_scores_match_a_direct_estimate(tmp_path: Path) -> None:
    """The MLP scores are |sum a * dL/da| over the tokens, computed here with autograd."""
    from core.formats.base import ModelInfo

    model, _ = _load(tmp_path)
    net = model.model
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        captured.append(args[0])

    handle = net.model.layers[0].mlp.down_proj.register_forward_pre_hook(keep)
    out = net(input_ids=IDS, labels=IDS, use_cache=False)
    (out.loss * IDS.shape[0]).backward()
    handle.remove()
    a = captured[0]
    expected = (a * a.grad).reshape(-1, 64).sum(0).abs()
    net.zero_grad(set_to_none=True)
    info = ModelInfo(format="hf", num_parameters=0, inputs=(), prunable_layers=())
    outcome = _prune(net, info, _width("taylor", mlp=0.5))
    kept = outcome.details["kept_mlp"]["model.layers.0"]
    assert kept == sorted(expected.argsort(descending=True)[:32].tolist())


def test_depth_cuts_per_layer_config_lists(tmp_path: Path) -> None:
    model, info = _load(tmp_path, "qwen2")
    model.model.config.layer_types = ["full_attention", "sliding_attention"]
    outcome = _prune(model, info, _depth(1, "random"))
    kept = 0 if outcome.details["removed_layers"] == ["model.layers.1"] else 1
    expected = ["full_attention", "sliding_attention"][kept]
    assert model.model.config.layer_types == [expected]


def _pipeline(spec: Any, tmp_path: Path, fine_tune: bool) -> Any:
    import inspect
    import json
    import textwrap

    from core.pipeline import MeasureConfig, PipelineData, run
    from core.spec import CalibrationSpec, EvaluationSpec, FineTuneSpec, JobSpec

    _, saved = save_checkpoint("llama", tmp_path / "ck")
    checkpoint = archive_folder(saved, tmp_path / "llama.tar")
    text = tmp_path / "corpus.txt"
    text.write_text(textwrap.dedent(inspect.getsource(json.decoder)))
    job = JobSpec(
        pruning=spec,
        calibration=CalibrationSpec(num_samples=8, seq_len=32),
        fine_tune=FineTuneSpec(steps=5, batch_size=4, lr=3e-3, loss="causal_lm", seq_len=32)
        if fine_tune
        else None,
        evaluation=EvaluationSpec(task="perplexity", seq_len=32, max_samples=8),
    )
    data = PipelineData(fine_tune=text, evaluation=text, calibration=text)
    fast = MeasureConfig(batch_size=1, warmup=0, repeats=1)
    return run(job, checkpoint, tmp_path / "out", measure=fast, data=data)


def test_pipeline_narrows_fine_tunes_and_measures(tmp_path: Path) -> None:
    result = _pipeline(_width(mlp=0.5, heads=0.5), tmp_path, fine_tune=True)
    m = result.metrics
    assert m.params_after < m.params_before
    assert m.macs_after < m.macs_before
    assert m.eval_after_fine_tune is not None


def test_pipeline_removes_a_layer(tmp_path: Path) -> None:
    result = _pipeline(_depth(1), tmp_path, fine_tune=False)
    assert result.metrics.params_after < result.metrics.params_before


def test_pipeline_fine_tunes_after_depth(tmp_path: Path) -> None:
    # A removed layer's weights are gone: recovery holds no zeros after width or depth.
    result = _pipeline(_depth(1), tmp_path, fine_tune=True)
    assert result.metrics.params_after < result.metrics.params_before
