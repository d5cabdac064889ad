"""The search on language models (``hf``, ``unstructured``): decoder layers scanned one at a time
by perplexity, ratios allocated to a ``params`` or ``max_perplexity_increase`` target, and what
that buys over one uniform ratio, on a tiny Llama trained here on standard-library source."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.errors import InvalidSpec
from core.formats import detect
from core.pipeline import MeasureConfig, PipelineData, run
from core.pruning.llm.layers import prunable_linears
from core.search import open_scanner
from core.search.allocate import uniform_to_budget
from core.search.lm import lm_with_ratios
from core.search.plots import layer_sparsity_data, sensitivity_data
from core.search.targets import (
    check_target,
    choose,
    choose_measured,
    judge,
)
from core.spec import JobSpec
from tests.core.lm_search import scan
from tests.hf_factories import archive_folder, trained_llama

FAST = MeasureConfig(batch_size=1, warmup=0, repeats=1)
SEQ = 32
GRID = [0.2, 0.4, 0.6, 0.8]


def _text() -> str:
    import argparse
    import textwrap

    return inspect.getsource(argparse) + inspect.getsource(textwrap)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 4-layer Llama (width 32) trained for 200 steps on argparse and textwrap source, as an
    uploaded checkpoint, with its training text (calibration) and two held-out texts: the
    search's and the evaluation's."""
    root = tmp_path_factory.mktemp("lm-search")
    text = _text()
    cut = int(len(text) * 0.8)
    folder = trained_llama(root / "checkpoint", text[:cut], layers=4, steps=200, seq=SEQ)
    # Held out from training, both: the search text and the evaluation text it predicts for.
    middle = (cut + len(text)) // 2
    files = {"train": text[:cut], "search": text[cut:middle], "eval": text[middle:]}
    for name, part in files.items():
        (root / f"{name}.txt").write_text(part)
    return SimpleNamespace(
        checkpoint=archive_folder(folder, root / "llama.tar"),
        **{name: root / f"{name}.txt" for name in files},
    )


def job(criterion: str = "magnitude", target: dict | None = None) -> JobSpec:
    return JobSpec.model_validate(
        {
            "pruning": {
                "criterion": criterion,
                "granularity": "unstructured",
                "target": target or {"params": 0.6},
                "search": {"grid": GRID, "num_samples": 16},
            },
            "calibration": {"num_samples": 8, "seq_len": SEQ} if criterion != "magnitude" else None,
            "evaluation": {"task": "perplexity", "seq_len": SEQ, "max_samples": 64},
        }
    )


def nm_job(criterion: str = "magnitude", target: dict | None = None, **pruning: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "pruning": {
                "criterion": criterion,
                "granularity": "n:m",
                "target": target or {"params": 0.8},
                "search": {"num_samples": 64},
                **pruning,
            },
            "calibration": {"num_samples": 8, "seq_len": SEQ} if criterion != "magnitude" else None,
            "evaluation": {"task": "perplexity", "seq_len": SEQ, "max_samples": 64},
        }
    )


def prune_at(spec: JobSpec, ratios: dict[str, float], lm: SimpleNamespace, out: Path):
    pruning = lm_with_ratios(spec.pruning, ratios)
    data = PipelineData(evaluation=lm.eval, calibration=lm.train)
    resolved = spec.model_copy(update={"pruning": pruning})
    return run(resolved, lm.checkpoint, out, measure=FAST, data=data).metrics


def kept_params(metrics) -> float:
    return metrics.nonzero_params_after / metrics.params_before


# --- the scan ---------------------------------------------------------------------------------


def test_a_cell_prunes_one_decoder_layer_and_puts_it_back(lm: SimpleNamespace) -> None:
    scanner = open_scanner(job(), lm.checkpoint, lm.search)
    units = scanner.units()
    assert [u.key for u in units] == [f"model.layers.{i}" for i in range(4)]
    assert all(len(u.layers) == 7 for u in units)  # q k v o gate up down
    dense = scanner.score(None, 0.0)
    assert dense["perplexity"] == pytest.approx(torch.tensor(dense["loss"]).exp().item())
    pruned = scanner.score("model.layers.1", 0.8)
    assert pruned["loss"] > dense["loss"]
    assert scanner.score(None, 0.0) == dense  # the layer's weights were put back


def test_layers_fixed_by_the_user_are_not_scanned(lm: SimpleNamespace) -> None:
    spec = job().model_copy(deep=True)
    pruning = spec.pruning.model_copy(
        update={"exclude": ["model.layers.0.*"], "layer_sparsity": {"model.layers.3.mlp.*": 0.5}}
    )
    scanner = open_scanner(spec.model_copy(update={"pruning": pruning}), lm.checkpoint, lm.search)
    assert [u.key for u in scanner.units()] == ["model.layers.1", "model.layers.2"]


def test_targets_are_checked_for_language_models() -> None:
    check_target("hf", job())
    check_target("hf", job(target={"max_perplexity_increase": 0.1}))
    for cost in ("macs", "latency"):  # zeros leave dense MACs, and so latency, as they are
        with pytest.raises(InvalidSpec, match=r"granularity 'unstructured'.*dense kernels"):
            check_target("hf", job(target={cost: 0.5}))
    with pytest.raises(InvalidSpec, match="'hf'"):
        check_target("hf", job(target={"max_accuracy_drop": 0.01}))
    with pytest.raises(InvalidSpec, match="'pt2'"):
        check_target("pt2", job(target={"max_perplexity_increase": 0.1}))
    check_target("hf", nm_job())
    check_target("hf", nm_job(target={"max_perplexity_increase": 0.1}))
    for cost in ("macs", "latency"):
        with pytest.raises(InvalidSpec, match=r"granularity 'n:m'.*dense kernels"):
            check_target("hf", nm_job(target={cost: 0.5}))
    with pytest.raises(InvalidSpec, match="leave 'grid' out"):
        check_target("hf", nm_job(search={"grid": GRID}))


# --- what the search buys ---------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_a_params_target_is_met_and_beats_uniform(
    lm: SimpleNamespace, criterion: str, tmp_path: Path
) -> None:
    """At 55% of the parameters kept: met within 2% (the cost model counts as the pruner
    removes), and the searched per-layer ratios score no worse than one uniform ratio at the
    same parameters, on the held-out evaluation text."""
    target = 0.55
    spec = job(criterion, {"params": target})
    found = scan(spec, lm)
    choice = choose(spec.pruning.target, found.curves, found.curves, found.cost)
    searched = prune_at(spec, choice.ratios, lm, tmp_path / "searched")
    assert target - 0.02 <= kept_params(searched) <= target + 1e-9
    assert kept_params(searched) == pytest.approx(choice.cost, abs=1e-9)  # exact prediction

    fraction = lambda r: found.cost.fraction("params", r)  # noqa: E731
    uniform = uniform_to_budget(found.keys, fraction, kept_params(searched))
    flat = prune_at(spec, dict.fromkeys(found.keys, uniform), lm, tmp_path / "uniform")
    assert kept_params(flat) <= kept_params(searched) + 0.005
    after = searched.eval_after_pruning["perplexity"]
    assert after <= flat.eval_after_pruning["perplexity"], (choice.ratios, uniform)


def test_a_perplexity_target_holds_on_the_evaluation_text(
    lm: SimpleNamespace, tmp_path: Path
) -> None:
    """Allowed 10% more perplexity: the curves alone over-promise (layers' damage adds up to
    more than their sum), so the choice is measured on the search text and tightened; the pruned
    model then stays within the allowance on the held-out evaluation text."""
    spec = job("magnitude", {"max_perplexity_increase": 0.1})
    target = spec.pruning.target
    assert target is not None
    found = scan(spec, lm)
    additive = choose(target, found.curves, found.curves, found.cost)
    choice, measured = choose_measured(
        target, found.curves, found.curves, found.cost, found.scanner
    )
    assert measured is not None
    assert measured <= 0.1
    assert choice.cost < 0.9  # it did remove something
    assert choice.cost >= additive.cost  # tightened, never loosened
    metrics = prune_at(spec, choice.ratios, lm, tmp_path)
    rise = judge(target, metrics.eval_before, metrics.eval_after_pruning)
    assert rise is not None
    assert 0.0 < rise <= 0.1, (choice.ratios, measured)


def test_plots_show_a_decoder_layers_ratio_on_its_linears() -> None:
    layers = [("model.layers.1.mlp.up_proj", 0.3), ("model.layers.10.mlp.up_proj", 0.6)]
    data = layer_sparsity_data(layers, {"model.layers.1": 0.3, "model.layers.10": 0.6})
    assert data.series[1].y == (0.3, 0.6)
    assert sensitivity_data({"model.layers.1": {0.5: {"perplexity": 9.0, "loss": 2.2}}}, {
        "perplexity": 8.0, "loss": 2.1}).ylabel == "perplexity"  # fmt: skip


# --- n:m: each decoder layer dense or n:m ---------------------------------------------------------


def nm_runs(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros of every run of ``m`` input features of an ``(out, in)`` weight."""
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)


def test_an_nm_cell_makes_one_decoder_layer_nm(lm: SimpleNamespace) -> None:
    spec = nm_job(exclude=["model.layers.0.mlp.*"])
    scanner = open_scanner(spec, lm.checkpoint, lm.search)
    assert scanner.grid == (0.5,)
    assert [u.key for u in scanner.units()] == [f"model.layers.{i}" for i in range(4)]
    # The user's exclude keeps layer 0's MLP dense; its attention is still searched.
    assert [n.rsplit(".", 1)[1] for n in scanner.unit("model.layers.0").layers] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    linears = prunable_linears(scanner.model.model)
    dense = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    unit = scanner.unit("model.layers.1")
    scanner.family.prune_one(scanner.model, scanner.info, spec.pruning, unit, 0.5, None)
    zeros = 0
    for name, lin in linears.items():
        if name in unit.layers:
            assert bool((nm_runs(lin.weight, 4) == 2).all()), name
            zeros += int((lin.weight == 0).sum())
        else:
            assert torch.equal(lin.weight, dense[name]), name
    cost = scanner.cost_model()
    assert cost.params({unit.key: 0.5}) == cost.params({}) - zeros
    assert cost.levels == {u.key: (0.5,) for u in scanner.units()}


def prune_nm(
    spec: JobSpec, found: SimpleNamespace, ratios: dict[str, float], lm: SimpleNamespace, out: Path
):
    """The pipeline's result at ``ratios`` (evaluated on the search text) and its linears."""
    pruning = found.scanner.with_ratios(spec.pruning, ratios)
    resolved = spec.model_copy(update={"pruning": pruning})
    data = PipelineData(evaluation=lm.search, calibration=lm.train)
    result = run(resolved, lm.checkpoint, out, measure=FAST, data=data)
    model, _ = detect(result.artifacts["model"]).load(result.artifacts["model"])
    return result.metrics, prunable_linears(model.model)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_a_params_target_at_nm_makes_the_chosen_layers_nm_and_leaves_the_rest_dense(
    lm: SimpleNamespace, criterion: str, tmp_path: Path
) -> None:
    spec = nm_job(criterion, {"params": 0.8})
    assert spec.pruning.target is not None
    found = scan(spec, lm)
    choice = choose(spec.pruning.target, found.curves, found.curves, found.cost)
    assert set(choice.ratios.values()) <= {0.0, 0.5}  # dense or n:m, nothing between
    chosen = {k for k, r in choice.ratios.items() if r > 0}
    assert 0 < len(chosen) < len(choice.ratios)
    metrics, linears = prune_nm(spec, found, choice.ratios, lm, tmp_path)
    assert kept_params(metrics) <= 0.8
    assert kept_params(metrics) == pytest.approx(choice.cost, abs=1e-12)  # counted exactly
    dense = prunable_linears(found.scanner.model.model)  # the scan restored every cell
    for name, lin in linears.items():
        if name.rsplit(".", 2)[0] in chosen:
            assert bool((nm_runs(lin.weight, 4) == 2).all()), name
        else:
            assert torch.equal(lin.weight, dense[name].weight), name


def test_a_perplexity_target_at_nm_holds_on_the_search_text(
    lm: SimpleNamespace, tmp_path: Path
) -> None:
    """As many decoder layers 2:4 as 10% more perplexity allows: predicted from the curves,
    measured with every chosen layer at once and tightened, then held by the pruned model on
    the search text (the same blocks the search measured on)."""
    spec = nm_job("magnitude", {"max_perplexity_increase": 0.1})
    target = spec.pruning.target
    assert target is not None
    found = scan(spec, lm)
    choice, measured = choose_measured(
        target, found.curves, found.curves, found.cost, found.scanner
    )
    assert measured is not None
    assert measured <= 0.1
    assert any(r > 0 for r in choice.ratios.values())  # some layers are 2:4
    metrics, _ = prune_nm(spec, found, choice.ratios, lm, tmp_path)
    rise = judge(target, metrics.eval_before, metrics.eval_after_pruning)
    assert rise is not None
    assert 0.0 < rise <= 0.1
    assert rise == pytest.approx(measured, rel=1e-3)
