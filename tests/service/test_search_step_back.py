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
