"""The search on language models at ``width`` (``hf``): the width kinds (MLP neurons, key/value
groups, hidden channels) scanned one at a time by perplexity, fractions allocated to a ``macs``,
``params`` or ``max_perplexity_increase`` target, on a tiny grouped-query Llama trained here."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import InvalidSpec
from core.pipeline import MeasureConfig, PipelineData, run
from core.search import Scanning, open_scanner
from core.search.lm_width import width_with_ratios
from core.search.targets import check_target, choose, choose_measured, judge
from core.spec import JobSpec
from tests.core.lm_search import scan
from tests.hf_factories import archive_folder, save_checkpoint, trained_llama

FAST = MeasureConfig(batch_size=1, warmup=0, repeats=1)
SEQ = 32
GRID = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 2-layer Llama (hidden 32, 4 heads in 2 key/value groups, 64 MLP neurons) trained for
    120 steps on argparse's source, with its training text and a held-out search text."""
    import argparse

    root = tmp_path_factory.mktemp("lm-width")
    text = inspect.getsource(argparse)
    cut = int(len(text) * 0.8)
    folder = trained_llama(root / "checkpoint", text[:cut], layers=2, steps=120, seq=SEQ)
    (root / "train.txt").write_text(text[:cut])
    (root / "search.txt").write_text(text[cut:])
    return SimpleNamespace(
        checkpoint=archive_folder(folder, root / "llama.tar"),
        train=root / "train.txt",
        search=root / "search.txt",
    )


def job(target: dict, criterion: str = "magnitude", width: dict | None = None) -> JobSpec:
    pruning: dict = {
        "criterion": criterion,
        "granularity": "width",
        "target": target,
        "search": {"grid": GRID, "num_samples": 8},
    }
    if width is not None:
        pruning["width"] = width
    return JobSpec.model_validate(
        {
            "pruning": pruning,
            "calibration": {"num_samples": 4, "seq_len": SEQ} if criterion != "magnitude" else None,
            # The same blocks the scan scores: the search text is what the target is held on.
            "evaluation": {"task": "perplexity", "seq_len": SEQ, "max_samples": 8},
        }
    )


def prune_at(spec: JobSpec, ratios: dict[str, float], lm: SimpleNamespace, out: Path):
    resolved = spec.model_copy(update={"pruning": width_with_ratios(spec.pruning, ratios)})
    data = PipelineData(evaluation=lm.search, calibration=lm.train)
    return run(resolved, lm.checkpoint, out, measure=FAST, data=data), resolved


# --- the units and the scan -------------------------------------------------------------------


def test_the_units_are_the_width_kinds_the_layout_can_remove(
    lm: SimpleNamespace, tmp_path: Path
) -> None:
    scanner = open_scanner(job({"macs": 0.7}), lm.checkpoint, lm.search)
    units = {u.key: u for u in scanner.units()}
    # LlamaConfig wants hidden_size a multiple of the 4 heads: hidden goes in steps of 4.
    assert {k: u.size for k, u in units.items()} == {"mlp": 64, "heads": 2, "hidden": 8}
    assert units["mlp"].layers[:3] == tuple(
        f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")
    )
    dense = scanner.score(None, 0.0)
    narrowed = scanner.score("mlp", 0.75)
    assert narrowed["loss"] > dense["loss"]
    assert scanner.score(None, 0.0) == dense  # the cell pruned a copy

    fixed = open_scanner(job({"macs": 0.7}, width={"heads": 0.5}), lm.checkpoint, lm.search)
    assert {u.key: u.size for u in fixed.units()} == {"mlp": 64, "hidden": 16}  # 2 heads left
    # The scan starts from the user's fixed kinds: its baseline has half the heads gone.
    assert fixed.score(None, 0.0)["loss"] != pytest.approx(dense["loss"], abs=1e-4)

    gpt2 = archive_folder(save_checkpoint("gpt2", tmp_path / "gpt2")[1], tmp_path / "gpt2.tar")
    only_mlp = open_scanner(job({"params": 0.9}), gpt2, lm.search)
    assert [u.key for u in only_mlp.units()] == ["mlp"]  # GPT-2's fixed head size: MLP only


def test_width_targets_are_checked() -> None:
    check_target("hf", job({"macs": 0.5}))
    check_target("hf", job({"params": 0.5}, width={"hidden": 0.0}))
    check_target("hf", job({"max_perplexity_increase": 0.1}))
    check_target("hf", job({"latency": 0.5}, width={"mlp": 0.25, "heads": 0.5}))
    # Every kind fixed beside a target: nothing is left to search, whatever the model.
    every = {"mlp": 0.25, "heads": 0.0, "hidden": 0.0}
    with pytest.raises(InvalidSpec, match=r"'pruning\.width' fixes every width kind") as raised:
        check_target("hf", job({"latency": 0.5}, width=every))
    assert raised.value.field == "pruning.width"
    depth = JobSpec.model_validate(
        {"pruning": {"criterion": "random", "granularity": "depth", "target": {"params": 0.5}}}
    )
    with pytest.raises(InvalidSpec, match="granularity 'depth'"):
        check_target("hf", depth)


def test_the_kinds_the_user_fixed_survive_storage() -> None:
    """Beside a target, ``width`` names the fixed kinds; a spec stored as JSON reads back the
    same, and without a target ``width`` is still required at granularity ``width``."""
    spec = job({"params": 0.5}, width={"heads": 0.25})
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))
    assert stored["pruning"]["width"] == {"heads": 0.25}
    back = JobSpec.model_validate(stored)
    assert back.pruning.width is not None
    assert back.pruning.width.model_fields_set == {"heads"}
    resolved = width_with_ratios(back.pruning, {"mlp": 0.5, "hidden": 0.125})
    assert resolved.width is not None
    assert resolved.target is None
    assert resolved.width.model_dump() == {"mlp": 0.5, "heads": 0.25, "hidden": 0.125}
    with pytest.raises(ValueError, match="takes its amounts in 'width'"):
        JobSpec.model_validate({"pruning": {"criterion": "magnitude", "granularity": "width"}})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_the_cost_model_predicts_what_the_job_measures(
    lm: SimpleNamespace, tmp_path: Path, arch: str
) -> None:
    """Every kind at once, on grouped-query Llama, Qwen2 (q/k/v biases) and Qwen3 (tied
    embeddings, head_dim apart from hidden / heads): the predicted MACs per token and parameters
    are exactly what the pruned model measures."""
    folder = save_checkpoint(arch, tmp_path / arch)[1]
    checkpoint = archive_folder(folder, tmp_path / f"{arch}.tar")
    spec = job({"macs": 0.5})
    scanner = open_scanner(spec, checkpoint, lm.search)
    units = scanner.units()
    assert [u.key for u in units] == ["mlp", "heads", "hidden"]
    ratios = {u.key: max(u.size // 4, 1) / u.size for u in units}
    cost = scanner.cost_model()
    pruning = width_with_ratios(spec.pruning, ratios)
    resolved = spec.model_copy(update={"pruning": pruning, "evaluation": None})
    m = run(resolved, checkpoint, tmp_path / "out", measure=FAST).metrics
    assert cost.fraction("macs", ratios) == pytest.approx(m.macs_after / m.macs_before, abs=1e-12)
    assert cost.fraction("params", ratios) == pytest.approx(
        m.params_after / m.params_before, abs=1e-12
    )
    assert m.params_after < m.params_before


# --- targets met ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, lm: SimpleNamespace) -> SimpleNamespace:
    """A 2-layer grouped-query Llama wide enough (hidden 256, 1,024 MLP neurons) that its
    forward's time is mostly matmuls, not Python: narrowing it shortens the forward."""
    root = tmp_path_factory.mktemp("lm-wide")
    folder = save_checkpoint("llama", root / "checkpoint", hidden_size=256, intermediate_size=1024)[
        1
    ]
    return SimpleNamespace(
        checkpoint=archive_folder(folder, root / "llama.tar"), search=lm.search, train=lm.train
    )


class Timed:
    """The scanner, with every latency fraction it measures for the search kept (in order)."""

    def __init__(self, scanner: Scanning) -> None:
        self.scanner = scanner
        self.measured: list[tuple[dict[str, float], float]] = []

    def latency_fraction(self, ratios: dict[str, float], config: MeasureConfig) -> float:
        value = self.scanner.latency_fraction(ratios, config)
        self.measured.append((dict(ratios), value))
        return value


def test_a_latency_target_is_met_as_measured(wide: SimpleNamespace) -> None:
    """Allocated through MACs per token, then each candidate (the narrowed copy the job would
    export) timed against the dense model with the job's own ``latency_ms`` timer, and
    tightened while it misses: the search stops at the first candidate within the target and
    reports that measurement. Only the job's logic is asserted, no speedup (timings are noisy)."""
    spec = job({"latency": 0.8})
    target = spec.pruning.target
    assert target is not None
    found = scan(spec, wide)
    timed = Timed(found.scanner)
    config = MeasureConfig(batch_size=1, warmup=1, repeats=5)
    choice, measured = choose_measured(
        target, found.curves, found.curves, found.cost, timed, config
    )
    assert timed.measured, "the candidates were measured"
    assert measured is not None
    assert measured <= 0.8, timed.measured
    # What the search reports is what was measured for its choice, not the MACs it predicted.
    assert (choice.ratios, measured) == timed.measured[-1]
    # The first candidate is the MACs allocation itself; every one that missed was tightened.
    assert timed.measured[0][0] == choose(target, found.curves, found.curves, found.cost).ratios
    assert all(value > 0.8 for _, value in timed.measured[:-1])
    # Every candidate is a MACs allocation within the target (tightening only lowers it).
    assert all(found.cost.fraction("macs", r) <= 0.8 + 1e-9 for r, _ in timed.measured)


@pytest.mark.parametrize(
    ("target", "width"), [({"macs": 0.6}, None), ({"params": 0.7}, {"heads": 0.5})]
)
def test_a_cost_target_is_met_as_predicted_and_reloads(
    lm: SimpleNamespace, tmp_path: Path, target: dict, width: dict | None
) -> None:
    """Met within 2%, the prediction exactly what the job measures (MACs per token or
    parameters), a fixed kind kept at the user's fraction, and the pruned checkpoint loads with
    stock ``AutoModelForCausalLM`` at the sizes the fractions give."""
    from transformers import AutoModelForCausalLM

    spec = job(target, width=width)
    kind, value = next(iter(target.items()))
    found = scan(spec, lm)
    assert spec.pruning.target is not None
    choice = choose(spec.pruning.target, found.curves, found.curves, found.cost)
    result, resolved = prune_at(spec, choice.ratios, lm, tmp_path / "out")
    m = result.metrics
    kept = m.macs_after / m.macs_before if kind == "macs" else m.params_after / m.params_before
    assert value - 0.02 <= kept <= value + 1e-9, choice.ratios
    assert kept == pytest.approx(choice.cost, abs=1e-12)  # exact prediction
    assert found.cost.fraction("params", choice.ratios) == pytest.approx(
        m.params_after / m.params_before, abs=1e-12
    )
    assert found.cost.fraction("macs", choice.ratios) == pytest.approx(
        m.macs_after / m.macs_before, abs=1e-12
    )
    fractions = resolved.pruning.width.model_dump()
    for fixed, fraction in (width or {}).items():
        assert fractions[fixed] == fraction
        assert fixed not in choice.ratios

    folder = tmp_path / "reloaded"
    import tarfile

    with tarfile.open(result.model_path) as tar:
        tar.extractall(folder, filter="data")
    config_file = next(folder.rglob("config.json"))
    reloaded = AutoModelForCausalLM.from_pretrained(config_file.parent)
    config = reloaded.config
    assert config.intermediate_size == 64 - round(fractions["mlp"] * 64)
    assert config.num_key_value_heads == 2 - round(fractions["heads"] * 2)
    assert config.hidden_size == 32 - round(fractions["hidden"] * 32)
    assert sum(p.numel() for p in reloaded.parameters()) == m.params_after


def test_a_perplexity_target_holds_on_the_search_text(lm: SimpleNamespace, tmp_path: Path) -> None:
    """Allowed 15% more perplexity: the choice, measured with every fraction at once and
    tightened, is within it on the search text, and so is the model the job prunes."""
    spec = job({"max_perplexity_increase": 0.15}, criterion="activation")
    target = spec.pruning.target
    assert target is not None
    found = scan(spec, lm)
    choice, measured = choose_measured(
        target, found.curves, found.curves, found.cost, found.scanner
    )
    assert measured is not None
    assert measured <= 0.15
    assert choice.cost < 0.97, choice.ratios  # it did remove something
    result, _ = prune_at(spec, choice.ratios, lm, tmp_path)
    rise = judge(target, result.metrics.eval_before, result.metrics.eval_after_pruning)
    assert rise is not None
    assert rise == pytest.approx(measured, abs=1e-4)  # the same blocks, the same pruned model
    assert 0.0 < rise <= 0.15
