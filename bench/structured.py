"""Latency before/after 50% structured pruning on CPU: a CIFAR-shaped ResNet and a small
transformer. Medians of repeated runs, one thread, so numbers are comparable across machines.

    .venv/bin/python -m bench.structured            # results: docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from core.metrics import count_macs
from core.spec import PruningSpec
from core.structure import prune_program
from examples.models import Attention  # the hand-written, nanoGPT-style attention the tests use


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


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, hidden: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(32, dim)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, hidden) for _ in range(depth)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
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
