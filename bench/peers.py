"""Structured pruning, Shears vs Torch-Pruning, same model, same seed, same run: parameters, MACs,
CPU latency, and delivered speedup ÷ MAC reduction.

    .venv/bin/pip install torch-pruning          # the peer (not a project dependency)
    .venv/bin/python -m bench.peers              # --batch, --repeats, --threads, --sparsity

Both sides remove 50% of the channels of the CIFAR ResNet-18-style network of bench.structured by
L2 group magnitude (Shears: `criterion l2, granularity channel`; Torch-Pruning:
`MagnitudePruner` with `GroupMagnitudeImportance(p=2)`, the classifier ignored). Shears prunes
the exported program and re-exports it; Torch-Pruning prunes the eager module. Random weights:
this measures speed, not accuracy.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.structured import ResNet, median_ms
from core.metrics import count_macs
from core.spec import PruningSpec
from core.structure import prune_program


def measure(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[int, int, float]:
    params = sum(p.numel() for p in module.parameters())
    macs = count_macs(lambda: module(x), x.shape[0])
    return params, macs, median_ms(module, x, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    import torch_pruning as tp

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet().eval()
    x = torch.randn(args.batch, 3, 32, 32)
    dense = measure(model, x, args.repeats)

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        copy.deepcopy(model), (torch.randn(4, 3, 32, 32),), dynamic_shapes=({0: batch},)
    )
    dense_program = measure(program.module(), x, args.repeats)
    spec = PruningSpec(criterion="l2", granularity="channel", sparsity=args.sparsity)
    shears = measure(prune_program(program, spec).program.module(), x, args.repeats)

    peer = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        peer,
        torch.randn(1, 3, 32, 32),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=args.sparsity,
        ignored_layers=[peer.head],
    )
    pruner.step()
    theirs = measure(peer.eval(), x, args.repeats)

    print(
        f"CIFAR ResNet-18-style, {args.sparsity:.0%} channels, batch {args.batch}, "
        f"{args.threads} thread(s), median of {args.repeats} runs, torch {torch.__version__}, "
        f"torch-pruning {tp.__version__}\n"
    )
    print("| | parameters | MACs / sample | latency / batch | speedup ÷ MAC reduction |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| dense, eager module | {dense[0]:,} | {dense[1] / 1e6:.1f} M | {dense[2]:.1f} ms | |")
    print(f"| dense, exported program | | | {dense_program[2]:.1f} ms | |")
    # Each side against its own dense form: Shears runs exported programs, the peer eager modules.
    for name, (p, m, t), base in (
        ("Shears (exported program)", shears, dense_program),
        ("Torch-Pruning (eager module)", theirs, dense),
    ):
        ratio = (base[2] / t) / (base[1] / m)
        print(f"| {name} | {p:,} | {m / 1e6:.1f} M | {t:.1f} ms | {ratio:.2f} |")


if __name__ == "__main__":
    main()
