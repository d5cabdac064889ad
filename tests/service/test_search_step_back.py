"""The search's verification after pruning (worker/search.py ``prune_verified``): a quality target
missed on the evaluation data steps back to a smaller damage budget, for accuracy and for
perplexity alike. The pipeline is stood in for by a function that scores each spec it is given
by the sparsity it asks for (the step-back logic is what is tested)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from core.pipeline import PipelineResult
from core.report import Metrics
from core.search.allocate import Curve
from core.search.lm import LmCost, lm_with_ratios
from core.spec import JobSpec
from worker.search import Searched, prune_verified

LAYERS = ("model.layers.0", "model.layers.1")


def _spec(target: dict) -> JobSpec:
    return JobSpec.model_validate(
        {
            "pruning": {"criterion": "magnitude", "granularity": "unstructured", "target": target},
            "evaluation": {"task": "perplexity"},
        }
    )


def _result(perplexity: float) -> PipelineResult:
    metrics = Metrics(
        sparsity=0.0, params_before=1, params_after=1, nonzero_params_after=1, macs_before=1,
        macs_after=1, size_bytes_before=1, size_bytes_after=1, sparse_size_bytes_after=1,
        latency_ms_before=1.0, latency_ms_after=1.0, latency_batch_size=1, device="cpu",
        eval_before={"perplexity": 10.0, "loss": math.log(10.0)},
        eval_after_pruning={"perplexity": perplexity, "loss": math.log(perplexity)},
    )  # fmt: skip
    return PipelineResult(metrics, (), "hf", Path("report.json"))


def test_a_missed_perplexity_target_steps_back_to_a_smaller_budget() -> None:
    spec = _spec({"max_perplexity_increase": 0.1})
    # Predicted damage (loss) grows linearly with each layer's ratio.
    curves = [Curve(k, (0.0, 1.0), (0.0, 0.2)) for k in LAYERS]
    cost = LmCost(
        tensors={}, sizes={k: 64 for k in LAYERS}, reduces=frozenset({"params"}),
        shapes={k: ((64, 64),) for k in LAYERS},
    )  # fmt: skip
    first = {k: 0.24 for k in LAYERS}
    searched = Searched(
        spec.model_copy(update={"pruning": lm_with_ratios(spec.pruning, first)}),
        {"baseline": {"loss": math.log(10.0)}, "predicted": {}, "chosen": first},
        Path("sensitivity.json"), curves, cost, lm_with_ratios, lambda _m: 0,
    )  # fmt: skip
    asked: list[tuple[dict[str, float], bool]] = []

    def prune(pruned: JobSpec, again: bool) -> PipelineResult:
        ratios = dict(pruned.pruning.layer_sparsity)
        asked.append((ratios, again))
        # The real damage is twice the predicted one (layers compound).
        damage = sum(2 * 0.2 * r for r in ratios.values())
        return _result(10.0 * math.exp(damage))

    events: list[Any] = []
    result = prune_verified(spec, searched, prune, lambda *a: events.append(a))
    rises = [sum(2 * 0.2 * r for r in ratios.values()) for ratios, _ in asked]
    assert [again for _, again in asked] == [False, True]
    assert rises[1] < rises[0]
    final = result.metrics.eval_after_pruning
    assert final is not None
    assert final["perplexity"] / 10.0 - 1 <= 0.1
    assert "stepping back" in events[0][2]
    assert searched.summary["step_backs"] == 1
    assert all(k.endswith(".*") for ratios, _ in asked for k in ratios)


def _accuracy_result(accuracy: float) -> PipelineResult:
    metrics = Metrics(
        sparsity=0.0, params_before=1, params_after=1, nonzero_params_after=1, macs_before=1,
        macs_after=1, size_bytes_before=1, size_bytes_after=1, sparse_size_bytes_after=1,
        latency_ms_before=1.0, latency_ms_after=1.0, latency_batch_size=1, device="cpu",
        eval_before={"accuracy": 0.99}, eval_after_pruning={"accuracy": accuracy - 0.3},
        eval_after_fine_tune={"accuracy": accuracy},
    )  # fmt: skip
    return PipelineResult(metrics, (), "pt2", Path("report.json"))


def _accuracy_search(fine_tune: bool) -> tuple[JobSpec, Searched]:
    body: dict[str, Any] = {
        "pruning": {
            "criterion": "l1",
            "granularity": "unstructured",
            "target": {"max_accuracy_drop": 0.01},
        },
        "evaluation": {},
    }
    if fine_tune:
        body["fine_tune"] = {"epochs": 5}
    spec = JobSpec.model_validate(body)
    # Predicted accuracy drop (straight after pruning) grows linearly with each layer's ratio.
    curves = [Curve(k, (0.0, 1.0), (0.0, 0.4)) for k in LAYERS]
    cost = LmCost(
        tensors={}, sizes={k: 64 for k in LAYERS}, reduces=frozenset({"params"}),
        shapes={k: ((64, 64),) for k in LAYERS},
    )  # fmt: skip
    first = {k: 0.0125 for k in LAYERS}  # what the target itself allows: 0.01 of damage
    searched = Searched(
        spec.model_copy(update={"pruning": lm_with_ratios(spec.pruning, first)}),
        {"baseline": {"accuracy": 0.99}, "predicted": {}, "chosen": first},
        Path("sensitivity.json"), curves, cost, lm_with_ratios, lambda _m: 0,
    )  # fmt: skip
    return spec, searched


def test_a_fine_tuned_accuracy_target_starts_from_an_optimistic_budget() -> None:
    """Fine-tuning wins back most of the predicted drop: the first try prunes far more than the
    target's own budget allows, and steps back towards it while the verified drop is too large."""
    spec, searched = _accuracy_search(fine_tune=True)
    asked: list[float] = []

    def prune(pruned: JobSpec, again: bool) -> PipelineResult:
        ratio = max(dict(pruned.pruning.layer_sparsity).values())
        asked.append(ratio)
        # After fine-tuning, a layer ratio above 0.2 costs accuracy beyond the target.
        return _accuracy_result(0.99 - (0.05 if ratio > 0.2 else 0.005))

    result = prune_verified(spec, searched, prune, lambda *a: None)
    assert asked[0] > 0.2 >= asked[1] > 0.0125  # optimistic first, then the next budget held
    assert result.metrics.eval_after_fine_tune == {"accuracy": 0.985}
    assert searched.summary["damage_budget"] == 0.01 * 4


def test_without_fine_tuning_an_accuracy_target_starts_at_the_target() -> None:
    spec, searched = _accuracy_search(fine_tune=False)
    asked: list[float] = []

    def prune(pruned: JobSpec, again: bool) -> PipelineResult:
        asked.append(max(dict(pruned.pruning.layer_sparsity).values()))
        return _accuracy_result(0.985)

    prune_verified(spec, searched, prune, lambda *a: None)
    assert asked == [0.0125]  # the search's own choice, verified and kept
