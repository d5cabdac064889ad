"""Pruning and recovering by fine-tuning on scikit-learn's bundled 8x8 digits: Shears' fine-tune
settings against torch.nn.utils.prune followed by a plain loop (issue 12).

For each seed: train the residual CNN of ``examples/models.py``, export it with a dynamic batch,
then for each ``--variants`` entry run ``core.pipeline.run`` (global L1 unstructured at
``--sparsity``, fine-tune with the user's budget ``USER_BUDGET`` and the variant's settings), and
torch.nn.utils.prune.global_unstructured followed by the ten-line loop a user writes (AdamW at its
defaults, constant lr, same epochs and batch). Prints medians over seeds; ``--write`` updates its
section of docs/benchmarks.md. Reproduce::

    .venv/bin/python bench/finetune_digits.py --seeds 0 1 2 3 4 --write

``BUDGET``, ``shears``, ``finetune_eager`` and ``torch_prune`` are the DigitsCNN comparison that
bench/pruning.py reuses.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.finetune import _epoch_order  # noqa: E402
from core.pipeline import MeasureConfig, PipelineData, run  # noqa: E402
from core.spec import EvaluationSpec, FineTuneSpec, JobSpec, PruningSpec  # noqa: E402
from examples.models import (  # noqa: E402
    DIGITS_PRUNABLE,
    PRUNABLE,
    ResidualCNN,
    accuracy,
    digits_arrays,
    export_digits,
    save_npz,
    train_digits_cnn,
)

SPARSITY = 0.9
# The budget (issue 12): what a user would write, nothing tuned.
USER_BUDGET = {"epochs": 5, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw"}
# Shears' defaults before issue 12: cosine decay, no weight decay, BatchNorm statistics as dense.
OLD = {"schedule": "cosine", "weight_decay": 0.0, "batchnorm_samples": 0}
# Candidates, each measured before it became a default ({}: today's defaults).
VARIANTS: dict[str, dict[str, object]] = {
    "old": OLD,
    "old+bn": {**OLD, "batchnorm_samples": 256},
    "old+bn+wd": {**OLD, "batchnorm_samples": 256, "weight_decay": 0.01},
    "bn+wd+constant": {
        "schedule": "constant",
        "weight_decay": 0.01,
        "batchnorm_samples": 256,
    },
    "defaults": {},
    "defaults+kd": {"loss": "distillation", "alpha": 0.5, "temperature": 4.0},
    "defaults+kd1": {"loss": "distillation", "alpha": 1.0, "temperature": 4.0},
    # Pruning settings (the schedule) go to the pruning spec, the rest to the fine-tune.
    "gradual": {"schedule": {"kind": "iterative", "rounds": 5, "fine_tune_budget": "shared"}},
}


def shears_variant(
    model_path: Path,
    train: Path,
    test: Path,
    out: Path,
    overrides: dict[str, object],
    seed: int,
    sparsity: float = SPARSITY,
) -> dict[str, float]:
    pruning = {k: v for k, v in overrides.items() if k in PruningSpec.model_fields}
    tune = {k: v for k, v in overrides.items() if k not in pruning}
    spec = JobSpec(
        pruning=PruningSpec(
            criterion="l1", granularity="unstructured", sparsity=sparsity, scope="global", **pruning
        ),
        fine_tune=FineTuneSpec(**{**USER_BUDGET, "seed": seed, **tune}),  # type: ignore[arg-type]
        evaluation=EvaluationSpec(),
    )
    quick = MeasureConfig(batch_size=32, warmup=0, repeats=1)
    return job(spec, model_path, train, test, out, quick)


def job(
    spec: JobSpec, model_path: Path, train: Path, test: Path, out: Path, measure: MeasureConfig
) -> dict[str, float]:
    """Run ``spec`` through the pipeline; its accuracies, sparsity, MACs and seconds."""
    start = time.perf_counter()
    result = run(
        spec,
        model_path,
        out,
        measure=measure,
        data=PipelineData(fine_tune=train, evaluation=test),
    )
    m = result.metrics
    assert m.eval_before is not None
    assert m.eval_after_pruning is not None
    assert m.eval_after_fine_tune is not None
    return {
        "dense": m.eval_before["accuracy"],
        "pruned": m.eval_after_pruning["accuracy"],
        "tuned": m.eval_after_fine_tune["accuracy"],
        "sparsity": m.sparsity,
        "macs": m.macs_after,
        "dense_macs": m.macs_before,
        "seconds": time.perf_counter() - start,
    }


# --- the tuned budget and the DigitsCNN comparison that bench/pruning.py reuses ---------------

# The budget bench/pruning.py compares Shears and its peers with (tuned, with warm-up).
BUDGET = {
    "epochs": 8,
    "batch_size": 32,
    "lr": 5e-3,
    "warmup_steps": 10,
    "schedule": "cosine",
    "optimizer": "adamw",
}
DISTILL = {"temperature": 4.0, "alpha": 1.0}


def shears(
    model_path: Path,
    train: Path,
    test: Path,
    out: Path,
    loss: str,
    pruning: PruningSpec | None = None,
    seed: int = 0,
) -> dict[str, float]:
    spec = JobSpec(
        pruning=pruning
        or PruningSpec(
            criterion="l1", granularity="unstructured", sparsity=SPARSITY, scope="global"
        ),
        fine_tune=FineTuneSpec(
            **BUDGET, loss=loss, seed=seed, **(DISTILL if loss == "distillation" else {})
        ),
        evaluation=EvaluationSpec(),
    )
    return job(
        spec, model_path, train, test, out, MeasureConfig(batch_size=32, warmup=1, repeats=3)
    )


def lr_at(step: int, total: int) -> float:
    """The same warm-up + cosine schedule as core.finetune."""
    lr, warmup = BUDGET["lr"], BUDGET["warmup_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def finetune_eager(model: nn.Module, x, y, seed: int) -> None:
    """Fine-tune an eager module in place with BUDGET: the optimizer, learning rate, schedule,
    batch size, epochs and shuffling core.finetune uses, BatchNorm and dropout in train mode."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch, epochs = BUDGET["batch_size"], BUDGET["epochs"]
    per_epoch = len(yt) // batch + (1 if len(yt) % batch else 0)
    total = per_epoch * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=BUDGET["lr"])
    torch.manual_seed(seed)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(
            len(yt), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        )
        for i in range(per_epoch):
            rows = order[i * batch : (i + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[rows]), yt[rows]).backward()
            optimizer.step()
            step += 1
    model.eval()


def torch_prune(
    model: nn.Module,
    x,
    y,
    x_test,
    y_test,
    seed: int,
    sparsity: float = SPARSITY,
    layers: list[str] = DIGITS_PRUNABLE,
    loop: Callable[[nn.Module, Any, Any, int], None] | None = None,
) -> dict[str, float]:
    """torch.nn.utils.prune global L1 at the same sparsity over ``layers``, then ``loop``
    (default: the same fine-tune budget as Shears, :func:`finetune_eager`)."""
    model = copy.deepcopy(model)
    start = time.perf_counter()
    targets = [(model.get_submodule(n), "weight") for n in layers]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    pruned_acc = accuracy(model, x_test, y_test)
    (loop or finetune_eager)(model, x, y, seed)
    for module, name in targets:
        prune.remove(module, name)
    weights = [model.get_submodule(n).weight for n in layers]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "pruned": pruned_acc,
        "tuned": accuracy(model, x_test, y_test),
        "sparsity": zeros,
        "seconds": time.perf_counter() - start,
    }


# --- issue 12: the user's budget on the residual CNN -----------------------------------------


def train_dense(x, y, seed: int, epochs: int = 15) -> nn.Module:
    """The issue's residual CNN (width 16) trained on the digits (AdamW, one-cycle); eval mode."""
    return train_digits_cnn(x, y, epochs=epochs, seed=seed, make=lambda: ResidualCNN(width=16))


def plain_loop(model: nn.Module, x, y, seed: int, draw: int = 0) -> None:
    """The user's ten-line loop: AdamW at its defaults (weight decay 0.01), constant lr, the
    same epochs and batch size, BatchNorm and dropout in train mode. ``draw`` > 0 shuffles with
    another generator seed: the same loop on another batch order."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = USER_BUDGET["batch_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=USER_BUDGET["lr"])
    generator = torch.Generator().manual_seed(seed + 1000 * draw)
    model.train()
    for _ in range(int(USER_BUDGET["epochs"])):
        order = torch.randperm(len(yt), generator=generator)
        for begin in range(0, len(yt), batch):
            rows = order[begin : begin + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[rows]), yt[rows]).backward()
            optimizer.step()
    model.eval()


def same_order_loop(model: nn.Module, x, y, seed: int) -> None:
    """:func:`plain_loop` fed Shears' batches: ``core.finetune``'s per-epoch permutation for
    the seed, the same last partial batch. Everything else is the user's loop, so what is left
    between it and Shears is the exported graph against the eager module."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = USER_BUDGET["batch_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=USER_BUDGET["lr"])
    model.train()
    for epoch in range(int(USER_BUDGET["epochs"])):
        order = _epoch_order(len(yt), seed, epoch)
        for begin in range(0, len(yt), batch):
            rows = order[begin : begin + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[rows]), yt[rows]).backward()
            optimizer.step()
    model.eval()


def one_seed(
    seed: int, root: Path, variants: list[str], sparsities: list[float], draws: int = 0
) -> dict[float, dict[str, dict[str, float]]]:
    """One dense model per seed, pruned at every ratio: {sparsity: {method: figures}}."""
    x, y, x_test, y_test = digits_arrays(seed)
    model = train_dense(x, y, seed)
    dense = accuracy(model, x_test, y_test)
    model_path = export_digits(model, root / "cnn.pt2")
    train = save_npz(root / "train.npz", inputs=x, targets=y)
    test = save_npz(root / "test.npz", inputs=x_test, targets=y_test)
    out: dict[float, dict[str, dict[str, float]]] = {}
    for sparsity in sparsities:
        results = {"dense": {"tuned": dense}}
        for name in variants:
            results[name] = shears_variant(
                model_path, train, test, root / f"{name}-{sparsity}", VARIANTS[name], seed, sparsity
            )
            for draw in range(1, draws + 1):
                # Shears on other batch orders too: its fine-tune seed draws the order, as the
                # plain loop's generator seed does (seed + 1000 x draw on both sides).
                results[f"{name}@order{draw}"] = shears_variant(
                    model_path,
                    train,
                    test,
                    root / f"{name}-{sparsity}-order{draw}",
                    VARIANTS[name],
                    seed + 1000 * draw,
                    sparsity,
                )
        loops: dict[str, Callable[[nn.Module, Any, Any, int], None]] = {
            "plain_loop": plain_loop,
            "same_order": same_order_loop,
        }
        for draw in range(1, draws + 1):
            loops[f"order{draw}"] = functools.partial(plain_loop, draw=draw)
        for peer, loop in loops.items():
            results[peer] = torch_prune(
                model, x, y, x_test, y_test, seed, sparsity, layers=PRUNABLE, loop=loop
            )
        out[sparsity] = results
    return out


LABELS = {
    "old": "Shears, defaults before issue 12 (cosine, no weight decay, stale BatchNorm)",
    "old+bn": "Shears, cosine, no weight decay, BatchNorm re-estimated",
    "old+bn+wd": "Shears, cosine, weight decay 0.01, BatchNorm re-estimated",
    "bn+wd+constant": "Shears, constant lr, weight decay 0.01, BatchNorm re-estimated",
    "defaults": "Shears, today's defaults",
    "defaults+kd": "Shears, today's defaults + distillation from the dense model (alpha 0.5)",
    "defaults+kd1": "Shears, today's defaults + distillation only (alpha 1.0)",
    "gradual": "Shears, 5 rounds sharing the fine-tune's steps (`fine_tune_budget: shared`)",
    "plain_loop": "torch.nn.utils.prune + plain loop (AdamW defaults, constant lr)",
    "same_order": "torch.nn.utils.prune + plain loop fed Shears' batch order",
}


ORDER_LABEL = "torch.nn.utils.prune + plain loop, batch order drawn with seed + {}000"


def versus(results: list[dict[str, dict[str, float]]], key: str) -> str:
    """Mean over seeds of Shears minus the plain loop after fine-tuning, in points, and the
    seeds won/tied/lost."""
    return _summary([100 * (r[key]["tuned"] - r["plain_loop"]["tuned"]) for r in results])


def _summary(diffs: list[float]) -> str:
    """Differences in points as ``mean (won/tied/lost)``."""
    won = sum(d > 1e-6 for d in diffs)
    lost = sum(d < -1e-6 for d in diffs)
    return f"{statistics.mean(diffs):+.2f} ({won}/{len(diffs) - won - lost}/{lost})"


def table(results: list[dict[str, dict[str, float]]], keys: list[str]) -> str:
    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in results)

    def per_seed(key: str, field: str) -> str:
        return " / ".join(f"{100 * r[key][field]:.2f}" for r in results)

    lines = [
        "| method | after pruning | after fine-tune (median) | fine-tune per seed "
        "| − plain loop, mean (won/tied/lost) | sparsity |",
        "| --- | ---: | ---: | --- | --- | ---: |",
        f"| dense (no pruning) | | {100 * med('dense', 'tuned'):.2f}% "
        f"| {per_seed('dense', 'tuned')} | | 0% |",
    ]
    # Further batch orders are summed up below, not listed one by one.
    peers = ["plain_loop"] + (["same_order"] if all("same_order" in r for r in results) else [])
    for key in [*keys, *peers]:
        lines.append(
            f"| {_label(key)} "
            f"| {100 * med(key, 'pruned'):.2f}% | {100 * med(key, 'tuned'):.2f}% "
            f"| {per_seed(key, 'tuned')} | {versus(results, key) if key in keys else ''} "
            f"| {100 * med(key, 'sparsity'):.2f}% |"
        )
    pooled = [_pooled(results, key) for key in keys if all(f"{key}@order1" in r for r in results)]
    if pooled:
        lines += [
            "",
            "| pooled over seeds × batch orders | runs | after fine-tune (median) | mean "
            "| − plain loop, mean (won/tied/lost) |",
            "| --- | ---: | ---: | ---: | --- |",
            *(mine for mine, _ in pooled),
            pooled[0][1],  # the plain loop's runs, the same for every row above
        ]
    return "\n".join(lines)


def _label(key: str) -> str:
    name, _, draw = key.partition("@order")
    if draw:
        return f"{LABELS[name]}, batch order drawn with seed + {draw}000"
    return LABELS.get(key, ORDER_LABEL.format(key[5:]))


def _pooled(results: list[dict[str, dict[str, float]]], key: str) -> tuple[str, str]:
    """Shears' ``key`` and the plain loop, each on the seed's own order and every drawn one:
    the median over all those runs, and Shears minus the plain loop paired by seed and draw."""
    draws = [d for d in range(1, 10) if all(f"{key}@order{d}" in r for r in results)]
    mine = [r[key]["tuned"] for r in results] + [
        r[f"{key}@order{d}"]["tuned"] for r in results for d in draws
    ]
    peer = [r["plain_loop"]["tuned"] for r in results] + [
        r[f"order{d}"]["tuned"] for r in results for d in draws
    ]
    paired = _summary([100 * (a - b) for a, b in zip(mine, peer, strict=True)])
    rows = []
    for label, runs, diff in ((LABELS[key], mine, paired), (LABELS["plain_loop"], peer, "")):
        rows.append(
            f"| {label} | {len(runs)} | {100 * statistics.median(runs):.2f}% "
            f"| {100 * statistics.mean(runs):.2f}% | {diff} |"
        )
    return rows[0], rows[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--variants", nargs="*", default=["defaults"], choices=list(VARIANTS))
    parser.add_argument(
        "--order-draws",
        type=int,
        default=0,
        help="also run Shears and the plain loop on N other batch orders",
    )
    parser.add_argument("--out", type=Path, help="also write the raw figures (JSON) there")
    parser.add_argument(
        "--load", type=Path, nargs="+", help="merge raw figures of earlier runs (JSON) instead"
    )
    parser.add_argument(
        "--write", action="store_true", help="update its section of docs/benchmarks.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw: dict[str, dict[str, Any]] = {}  # seed -> sparsity -> method -> figures
    if args.load:
        for path in args.load:
            # Runs of the same seeds with other methods merge (the dense model is seeded).
            for seed, by_ratio in json.loads(path.read_text()).items():
                for ratio, methods in by_ratio.items():
                    raw.setdefault(seed, {}).setdefault(ratio, {}).update(methods)
    else:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                figures = one_seed(seed, Path(tmp), args.variants, args.sparsity, args.order_draws)
            raw[str(seed)] = {str(s): r for s, r in figures.items()}
            for s, r in figures.items():
                print(
                    f"sparsity {s} seed {seed}: "
                    + ", ".join(f"{k} {100 * v['tuned']:.2f}%" for k, v in r.items()),
                    flush=True,
                )
            if args.out:
                args.out.write_text(json.dumps(raw, indent=1))
    seeds = sorted(int(s) for s in raw)
    sparsities = sorted({float(s) for r in raw.values() for s in r})
    cells = [raw[str(seed)][str(s)] for seed in seeds for s in sparsities]
    variants = [v for v in VARIANTS if all(v in cell for cell in cells)]
    tables = {}
    for s in sparsities:
        tables[s] = table([raw[str(seed)][str(s)] for seed in seeds], variants)
        print(f"Sparsity {s:.0%}:\n{tables[s]}", flush=True)
    draws = sum(all(f"order{d}" in cell for cell in cells) for d in range(1, 10))
    if args.write:
        write_doc(tables, seeds, variants, draws)


def write_doc(
    tables: dict[float, str], seeds: list[int], variants: list[str], draws: int = 0
) -> None:
    import sklearn

    command = (
        ".venv/bin/python bench/finetune_digits.py --seeds "
        + " ".join(map(str, seeds))
        + " --sparsity "
        + " ".join(map(str, tables))
        + " --variants "
        + " ".join(variants)
        + (f" --order-draws {draws}" if draws else "")
        + " --write"
    )
    budget = ", ".join(f"{k} {v}" for k, v in USER_BUDGET.items())
    body = "\n\n".join(f"Sparsity {s:.0%}:\n\n{t}" for s, t in tables.items())
    pooled = (
        f" Below each table, every method again on the seed's batch order and {draws} others"
        " (order d drawn with seed + 1000·d, by Shears' fine-tune seed and by the plain"
        " loop's generator alike), pooled: runs = seeds × orders, and Shears minus the plain"
        " loop paired by seed and order."
        if draws
        else ""
    )
    section = f"""{SECTION}

The residual CNN of `examples/models.py` (width 16: two residual blocks with BatchNorm) trained on
scikit-learn's bundled 8x8 digits (1,347 training / 450 test images, a seeded split per seed),
exported with a dynamic batch. Every row removes the same share of the conv/linear weights by
one global L1 ranking and fine-tunes with the user's budget of issue 12 ({budget}); Shears
through `core.pipeline.run` with only the named settings changed, the peer with
torch.nn.utils.prune and a plain eager loop. Test accuracy (top-1), medians over seeds {seeds}
(one test image is 0.22 points); "− plain loop" is the mean over seeds of Shears' accuracy minus
the plain loop's, in points, with the seeds won/tied/lost.{pooled}

{body}

Reproduce (CPU, one thread):

```bash
{command}
```

Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.system()}; Python
{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, scikit-learn
{sklearn.__version__}; CPU only; torch threads {torch.get_num_threads()}.
"""
    _replace_section(ROOT / "docs" / "benchmarks.md", section)
    print("wrote its section of docs/benchmarks.md")


SECTION = "## Fine-tuning defaults vs a plain loop (issue 12, residual CNN on the digits)"


def _replace_section(path: Path, section: str) -> None:
    """Replace this benchmark's ``## `` section of the shared results file (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    title = section.splitlines()[0]
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
