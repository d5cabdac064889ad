"""Targets at ``n:m`` (issue 14): which layers to make 2:4, chosen by the search or by size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_nm.py          # ~1.5 min on 2 busy cores
    # results: docs/data/search_nm.json, docs/benchmarks.md ("Targets at n:m")

At n:m a layer is dense or n:m, so "how much" becomes "which layers". Each unit is scanned once
(pruned alone at 2:4, scored on the search data) and the allocation picks the set of units, as
a job does (``core.search``: the same scanner, curves, cost model and target registry).

- ``pt2``: a ResidualCNN (width 8) trained 8 epochs on the digits' training split, seeds 0-2;
  the test split halved into search data (the scan, BatchNorm re-estimation) and evaluation
  data (every figure). ``params`` targets: the search's layers against the obvious choice
  without curves, the largest layers first until the target is met (``by size``), and all
  layers 2:4. ``max_accuracy_drop``: the search's choice, verified on the evaluation data and
  stepped back (halved budget, at most twice) as a job without fine-tuning does.
- ``hf``: bench/search_lm.py's 4-layer Llama (d 128) trained 600 steps (its own folder), its
  search and evaluation texts; a decoder layer is one unit. ``params`` and
  ``max_perplexity_increase`` (the latter measured on the search text with every chosen layer at
  once and tightened, as the job does).
Accuracy and perplexity straight after pruning (no fine-tuning); medians over seeds for pt2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.pipeline import MeasureConfig, PipelineData, run  # noqa: E402
from core.search import open_scanner  # noqa: E402
from core.search.allocate import Choice, damage_budgets  # noqa: E402
from core.search.targets import (  # noqa: E402
    choose,
    choose_measured,
    curves_from_cells,
    judge,
    targets,
    within_damage,
)
from core.spec import JobSpec  # noqa: E402
from examples.models import (  # noqa: E402
    ResidualCNN,
    digits_arrays,
    export_digits,
    save_npz,
    train_digits_cnn,
)

FAST = MeasureConfig(batch_size=1, warmup=0, repeats=1)


def scan(spec: JobSpec, model: Path, search: Path, calibration: Path | None = None) -> Any:
    """The scanner, loss and accuracy curves (accuracy: loss where none), and the cost model."""
    scanner = open_scanner(spec, model, search, calibration)
    baseline = scanner.score(None, 0.0)
    keys = [u.key for u in scanner.units()]
    cells = {(k, r): scanner.score(k, r) for k in keys for r in scanner.grid}
    loss = curves_from_cells(keys, baseline, cells, "loss", higher_is_better=False)
    acc = (
        curves_from_cells(keys, baseline, cells, "accuracy", higher_is_better=True)
        if "accuracy" in baseline
        else loss
    )
    return scanner, loss, acc, scanner.cost_model()


def by_size(cost: Any, target: float) -> dict[str, float]:
    """Largest units first (most weights zeroed) until the kept parameters meet ``target``."""
    ratio = next(iter(cost.levels.values()))[0]
    ratios = dict.fromkeys(cost.levels, 0.0)
    for key in sorted(cost.drops, key=lambda k: -cost.drops[k]):
        if cost.fraction("params", ratios) <= target:
            break
        ratios[key] = ratio
    return ratios


def prune(
    spec: JobSpec, scanner: Any, ratios: Mapping[str, float], model: Path, data: PipelineData
) -> dict[str, Any]:
    """The pipeline at ``ratios``: kept parameters, scores before and after pruning."""
    pruning = scanner.with_ratios(spec.pruning, ratios)
    with tempfile.TemporaryDirectory() as out:
        result = run(
            spec.model_copy(update={"pruning": pruning}),
            model,
            Path(out),
            measure=FAST,
            data=data,
            after_prune=scanner.reestimate,  # as the scan did in every cell, and a job does
        )
    m = result.metrics
    return {
        "layers": sorted(k for k, r in ratios.items() if r > 0),
        "kept_params": m.nonzero_params_after / m.params_before,
        "before": m.eval_before,
        "after": m.eval_after_pruning,
    }


def verified(
    spec: JobSpec, scanner: Any, choice: Choice, curves: Any, cost: Any, model: Path, data: Any
) -> dict[str, Any]:
    """A quality target as a job without fine-tuning verifies it (worker/search.py's
    ``prune_verified``): the choice, then halved damage budgets while the evaluation data says
    it missed."""
    target = spec.pruning.target
    assert target is not None
    budgets = damage_budgets(targets()[target.kind].damage_budget(target.value), fine_tunes=False)
    for step, budget in enumerate(budgets):
        if step:
            choice = within_damage(curves, cost, budget)
        row = prune(spec, scanner, choice.ratios, model, data)
        row["measured"] = judge(target, row["before"], row["after"])
        row["step_backs"] = step
        if row["measured"] is not None and row["measured"] <= target.value + 1e-9:
            break
    return row


def pt2(seed: int, work: Path) -> dict[str, Any]:
    x, y, x_test, y_test = digits_arrays(seed)
    net = train_digits_cnn(x, y, epochs=8, seed=seed, make=ResidualCNN)
    model = export_digits(net, work / f"res-{seed}.pt2")
    half = len(y_test) // 2
    search = save_npz(work / f"search-{seed}.npz", inputs=x_test[:half], targets=y_test[:half])
    held = save_npz(work / f"eval-{seed}.npz", inputs=x_test[half:], targets=y_test[half:])
    data = PipelineData(evaluation=held)

    def job(target: dict[str, float]) -> JobSpec:
        pruning = {"criterion": "l1", "granularity": "n:m", "target": target}
        return JobSpec.model_validate({"pruning": pruning, "evaluation": {}})

    out: dict[str, Any] = {}
    for value in (0.8, 0.7):
        spec = job({"params": value})
        assert spec.pruning.target is not None
        scanner, loss, acc, cost = scan(spec, model, search)
        searched = choose(spec.pruning.target, loss, acc, cost).ratios
        everything = {k: next(iter(v)) for k, v in cost.levels.items()}
        out[f"params {value}"] = {
            "search": prune(spec, scanner, searched, model, data),
            "by size": prune(spec, scanner, by_size(cost, value), model, data),
            "all 2:4": prune(spec, scanner, everything, model, data),
        }
    for value in (0.01, 0.03):
        spec = job({"max_accuracy_drop": value})
        assert spec.pruning.target is not None
        scanner, loss, acc, cost = scan(spec, model, search)
        choice = choose(spec.pruning.target, loss, acc, cost)
        out[f"max_accuracy_drop {value}"] = verified(spec, scanner, choice, acc, cost, model, data)
    return out


def hf(steps: int) -> dict[str, Any]:
    import bench.search_lm as lm_bench

    # bench/search_lm.py's recipe in a folder of its own: trained longer than its 100 steps (a
    # perplexity of 230 there, where making every layer 2:4 costs under 2%).
    lm_bench.WORK = Path("/tmp/shears-bench-search-nm")  # noqa: S108  (scratch)
    lm_bench.prepare(steps)
    archive = lm_bench.checkpoint()
    search, evaluation = lm_bench.texts()
    calibration = lm_bench.WORK / "train.txt"
    out: dict[str, Any] = {}
    for criterion in ("magnitude", "wanda"):

        def job(target: dict[str, float], criterion: str = criterion) -> JobSpec:
            return JobSpec.model_validate(
                {
                    "pruning": {
                        "criterion": criterion,
                        "granularity": "n:m",
                        "target": target,
                        "search": {"num_samples": 16},
                    },
                    "calibration": {"num_samples": 64, "seq_len": 64},
                    "evaluation": {"task": "perplexity", "seq_len": 64, "max_samples": 64},
                }
            )

        data = PipelineData(evaluation=evaluation, calibration=calibration)
        spec = job({"params": 0.8})
        assert spec.pruning.target is not None
        scanner, loss, _, cost = scan(spec, archive, search, calibration)
        everything = {k: next(iter(v)) for k, v in cost.levels.items()}
        rows = {
            "search": choose(spec.pruning.target, loss, loss, cost).ratios,
            "by size": by_size(cost, 0.8),
            "all 2:4": everything,
        }
        out[f"{criterion} params 0.8"] = {
            name: prune(spec, scanner, ratios, archive, data) for name, ratios in rows.items()
        }
        for value in (0.05, 0.1):
            spec = job({"max_perplexity_increase": value})
            assert spec.pruning.target is not None
            choice, measured = choose_measured(spec.pruning.target, loss, loss, cost, scanner)
            row = verified(spec, scanner, choice, loss, cost, archive, data)
            row["first_measured_on_search"] = measured
            out[f"{criterion} max_perplexity_increase {value}"] = row
    return out


def summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of the evaluation accuracy and kept parameters of every row."""
    out: dict[str, Any] = {}
    for case, rows in per_seed[0].items():
        names = rows if "search" in rows else {"search": rows}
        for name in names:
            picked = [s[case][name] if "search" in rows else s[case] for s in per_seed]
            out[f"{case} / {name}"] = {
                "accuracy": statistics.median(p["after"]["accuracy"] for p in picked),
                "dense": statistics.median(p["before"]["accuracy"] for p in picked),
                "kept_params": statistics.median(p["kept_params"] for p in picked),
                "layers": [p["layers"] for p in picked],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lm-steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "search_nm.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [pt2(seed, Path(tmp)) for seed in range(args.seeds)]
    result = {"pt2": summary(per_seed), "pt2_per_seed": per_seed, "hf": hf(args.lm_steps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"pt2": result["pt2"], "hf": result["hf"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
