"""Latency before/after 50% structured pruning on CPU: a CIFAR-shaped ResNet and a small
transformer. Medians of repeated runs, one thread, so numbers are comparable across machines.

    .venv/bin/python -m bench.structured            # results: docs/benchmarks.md

With ``--accuracy``: channel importance against Torch-Pruning's group importance on the digits
CNN (issue 12): accuracy straight after pruning at equal MACs, after BatchNorm re-estimation, and
after the same fine-tune budget, at 25/50/75% channels, medians over seeds::

    .venv/bin/python -m bench.structured --accuracy --seeds 0 1 2 --write
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.metrics import count_macs
from core.spec import PruningSpec
from core.structure import prune_program
from examples.models import (  # the hand-written, nanoGPT-style attention the tests use
    Attention,
    PreNormBlock,
)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + self.short(x))


class ResNet(nn.Module):
    """ResNet-18-style for 32x32 inputs, widths 64/128/256, two blocks per stage."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Transformer(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, hidden: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(32, dim)
        self.blocks = nn.Sequential(
            *(PreNormBlock(dim, heads, hidden, Attention) for _ in range(depth))
        )
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(x))).mean(dim=1))


def median_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def case(name: str, model: nn.Module, shape: tuple[int, ...], spec: PruningSpec, args) -> str:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.randn(4, *shape)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    pruned = prune_program(program, spec).program
    x = torch.randn(args.batch, *shape)
    before, after = program.module(), pruned.module()
    p0 = sum(p.numel() for p in program.parameters())
    p1 = sum(p.numel() for p in pruned.parameters())
    m0 = count_macs(lambda: before(x), args.batch)
    m1 = count_macs(lambda: after(x), args.batch)
    t0 = median_ms(before, x, args.repeats)
    t1 = median_ms(after, x, args.repeats)
    return (
        f"| {name} | {spec.granularity} {spec.sparsity:.0%} | {p0:,} → {p1:,} ({p1 / p0:.2f}x) "
        f"| {m0 / 1e6:.1f} → {m1 / 1e6:.1f} M | {t0:.1f} → {t1:.1f} ms ({t0 / t1:.2f}x faster) |"
    )


# --- channel importance vs Torch-Pruning (issue 12) --------------------------------------------

RATIOS = (0.25, 0.5, 0.75)
CRITERIA = ("l2", "group_l2")
# The user's budget of issue 12, the same for both sides: AdamW at its defaults, constant lr.
TUNE = {"epochs": 5, "batch_size": 64, "lr": 1e-3, "schedule": "constant", "weight_decay": 0.01}
BN_SAMPLES = 256


def _eager_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Torch-Pruning's model gets the same re-estimation as Shears: one batch, train mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        model(x)
    model.eval()
    # Left at None, the peer's fine-tune would average its running statistics over every step
    # (stale weights included) instead of the last ones, as Shears' exported graph does.
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _shears_side(path: Path, criterion: str, ratio: float, data: Any, x_test, y_test, seed: int):
    from core.batchnorm import reestimate_batchnorm
    from core.data import batch_range
    from core.finetune import fine_tune
    from core.formats.pt2.program import load_program
    from core.spec import FineTuneSpec
    from examples.models import accuracy

    program, info = load_program(path)
    spec = PruningSpec(criterion=criterion, granularity="channel", sparsity=ratio)
    pruned = prune_program(program, spec).program
    row = {"pruned": accuracy(pruned.module(), x_test, y_test)}
    rows = torch.randperm(data.num_samples, generator=torch.Generator().manual_seed(seed))
    reestimate_batchnorm(pruned, [data.inputs[0][rows[:BN_SAMPLES]]], batch_size=BN_SAMPLES)
    row["bn"] = accuracy(pruned.module(), x_test, y_test)
    fine_tune(
        pruned,
        data,
        FineTuneSpec(**TUNE, seed=seed, batchnorm_samples=0),  # type: ignore[arg-type]
        limits=batch_range(info.inputs),
    )
    row["tuned"] = accuracy(pruned.module(), x_test, y_test)
    x = torch.randn(2, 1, 8, 8)
    module = pruned.module()
    row["macs"] = count_macs(lambda: module(x), 2)
    return row


def accuracy_seed(seed: int, root: Path) -> dict[str, Any]:
    from bench.finetune_digits import plain_loop
    from bench.pruning import macs_of, torch_pruning_at_macs
    from core.data import load_dataset
    from examples.models import (
        accuracy,
        digits_arrays,
        export_digits,
        save_npz,
        train_digits_cnn,
    )

    x, y, x_test, y_test = digits_arrays(seed)
    model = train_digits_cnn(x, y, seed=seed, dropout=0.1)
    path = export_digits(model, root / "cnn.pt2")
    data = load_dataset(save_npz(root / "train.npz", inputs=x, targets=y))
    result: dict[str, Any] = {"dense": accuracy(model, x_test, y_test)}
    for ratio in RATIOS:
        sides = {c: _shears_side(path, c, ratio, data, x_test, y_test, seed) for c in CRITERIA}
        peer, _ = torch_pruning_at_macs(model, (1, 8, 8), sides["group_l2"]["macs"], ratio)
        theirs = {"pruned": accuracy(peer, x_test, y_test), "macs": macs_of(peer, (1, 8, 8))}
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        _eager_batchnorm(peer, torch.from_numpy(x)[order[:BN_SAMPLES]])
        theirs["bn"] = accuracy(peer, x_test, y_test)
        tuned = copy.deepcopy(peer)
        plain_loop(tuned, x, y, seed)
        theirs["tuned"] = accuracy(tuned, x_test, y_test)
        result[ratio] = {**sides, "tp": theirs}
        print(
            f"seed {seed} ratio {ratio}: "
            + ", ".join(
                f"{k} {100 * v['pruned']:.1f}/{100 * v['bn']:.1f}/{100 * v['tuned']:.1f}"
                for k, v in result[ratio].items()
            ),
            flush=True,
        )
    return result


def accuracy_table(results: list[dict[str, Any]]) -> str:
    names = {"l2": "Shears `l2`", "group_l2": "Shears `group_l2`", "tp": "Torch-Pruning"}
    lines = [
        "| channels removed | method | MACs / sample | straight after pruning "
        "| + BatchNorm re-estimated | after fine-tune |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for ratio in RATIOS:
        for key, label in names.items():

            def med(field: str, key: str = key, ratio: float = ratio) -> float:
                return statistics.median(r[ratio][key][field] for r in results)

            lines.append(
                f"| {ratio:.0%} | {label} | {med('macs') / 1e3:.0f} k | {100 * med('pruned'):.2f}% "
                f"| {100 * med('bn'):.2f}% | {100 * med('tuned'):.2f}% |"
            )
    return "\n".join(lines)


def accuracy_main(
    seeds: list[int], write: bool, out: Path | None = None, load: list[Path] | None = None
) -> None:
    """Run ``seeds`` (raw figures to ``out``), or merge the raw figures of earlier runs
    (``load``: seeds run in parallel processes), then print the table."""
    torch.set_num_threads(1)
    by_seed: dict[int, dict[str, Any]] = {}
    if load:
        for path in load:
            for seed, raw in json.loads(path.read_text()).items():
                by_seed[int(seed)] = {(k if k == "dense" else float(k)): v for k, v in raw.items()}
    else:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                by_seed[seed] = accuracy_seed(seed, Path(tmp))
            if out is not None:
                out.write_text(json.dumps({str(k): v for k, v in by_seed.items()}, indent=1))
    seeds = sorted(by_seed)
    results = [by_seed[s] for s in seeds]
    text = accuracy_table(results)
    print(text)
    if write:
        write_accuracy_doc(text, seeds, results)


def write_accuracy_doc(text: str, seeds: list[int], results: list[dict[str, Any]]) -> None:
    import torch_pruning as tp

    from bench.finetune_digits import _replace_section

    dense = statistics.median(r["dense"] for r in results)
    section = f"""## Channel importance vs Torch-Pruning at equal MACs (issue 12)

The digits CNN (3 convolutions with BatchNorm, dropout 0.1, one linear layer; dense median
{100 * dense:.2f}%), seeds {seeds}, medians. Shears removes 25/50/75% of the channels of every
prunable group by `l2` (the filters that produce a channel) and by `group_l2` (every coupled
tensor: producing filters, consuming input columns, BatchNorm scale; Torch-Pruning's
`GroupMagnitudeImportance(p=2)` with mean reduction). Torch-Pruning's `MagnitudePruner` with that
importance is set to the uniform ratio whose MACs come closest to Shears' `group_l2` result.
"Straight after pruning": the dense model's BatchNorm statistics; "+ BatchNorm re-estimated": both
sides measure them again on {BN_SAMPLES} training images (what a Shears job now does before its
after-pruning evaluation); "after fine-tune": both sides then train {TUNE["epochs"]} epochs, batch
{TUNE["batch_size"]}, AdamW lr {TUNE["lr"]}, weight decay {TUNE["weight_decay"]}, constant lr
(Shears through `core.finetune.fine_tune` on the exported program, Torch-Pruning through a plain
eager loop).

{text}

Reproduce (CPU):

```bash
.venv/bin/python -m bench.structured --accuracy --seeds {" ".join(map(str, seeds))} --write
```

Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.system()}; Python
{platform.python_version()}, torch {torch.__version__}, torch-pruning {tp.__version__}.
"""
    _replace_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", section)
    print("wrote its section of docs/benchmarks.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accuracy", action="store_true", help="importance vs Torch-Pruning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--write", action="store_true", help="--accuracy: update the doc")
    parser.add_argument("--out", type=Path, help="--accuracy: also write the raw figures there")
    parser.add_argument("--load", type=Path, nargs="+", help="--accuracy: merge earlier runs")
    args = parser.parse_args()
    if args.accuracy:
        accuracy_main(args.seeds, args.write, args.out, args.load)
        return
    torch.set_num_threads(args.threads)
    l1 = {"criterion": "l1", "sparsity": 0.5}
    rows = [
        case(
            "ResNet (CIFAR, 32x32)",
            ResNet(),
            (3, 32, 32),
            PruningSpec(granularity="channel", **l1),
            args,
        ),
        case(
            "Transformer (T=64, d=256)",
            Transformer(),
            (64, 32),
            PruningSpec(granularity="channel", **l1),
            args,
        ),
        case(
            "Transformer (T=64, d=256)",
            Transformer(),
            (64, 32),
            PruningSpec(granularity="head", **l1),
            args,
        ),
    ]
    print(
        f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats} runs, "
        f"torch {torch.__version__}"
    )
    print("| model | pruning | parameters | MACs / sample | latency / batch |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
