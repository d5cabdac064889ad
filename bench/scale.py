"""Global magnitude pruning of a >= 1B-parameter model on this CPU: time and extra memory of
Shears' core vs torch.nn.utils.prune, each side in its own process.

    .venv/bin/python bench/scale.py                 # both sides, 1.07B parameters, 80% global L1
    .venv/bin/python bench/scale.py --layers 4      # a quicker 268M-parameter run

Extra memory = peak RSS during the prune step - RSS with the weights loaded (VmHWM - VmRSS from
/proc); an out-of-memory kill is reported as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Imported here, before any baseline is read: only the prune step itself is measured.
from core.allocation import allocate  # noqa: E402
from core.spec import PruningSpec  # noqa: E402
from core.unstructured import prune_magnitude_in_place  # noqa: E402


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def shears_global_l1(weights: dict[str, Any], sparsity: float) -> None:
    """What core.pipeline runs for a magnitude criterion at unstructured granularity, with no
    per-layer cap, as torch.nn.utils.prune has none."""
    spec = PruningSpec(
        criterion="l1",
        granularity="unstructured",
        sparsity=sparsity,
        scope="global",
        max_layer_sparsity=1.0,
    )
    prune_magnitude_in_place(weights, allocate(spec, {n: w.numel() for n, w in weights.items()}))


def one_side(impl: str, layers: int, width: int, sparsity: float) -> dict[str, float]:
    import torch
    from torch.nn.utils import prune

    # Everything is imported before the baseline: only the prune step itself is measured.
    torch.manual_seed(0)
    with torch.no_grad():
        model = torch.nn.Sequential(
            *(torch.nn.Linear(width, width, bias=False) for _ in range(layers))
        ).requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * 4
    _reset_peak()
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if impl == "torch":
        targets = [(m, "weight") for m in model]
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        weights = {str(i): m.weight for i, m in enumerate(model)}
        shears_global_l1(weights, sparsity)
    elapsed = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    # Counted after the peak is read: the comparison's temporaries are not the prune step's.
    zeros = sum(int((m.weight == 0).sum()) for m in model)
    return {
        "params": params,
        "seconds": elapsed,
        "extra_bytes": (peak - base) * 1024,
        "extra_over_weights": (peak - base) * 1024 / weight_bytes,
        "sparsity": zeros / params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--side", choices=["shears", "torch"])
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=16.0,
        help="address-space limit of each side's process, so an out-of-memory is a clean failure "
        "of that process and never the machine's OOM killer",
    )
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args.side, args.layers, args.width, args.sparsity)))
        return
    rows = {}
    for side in ("shears", "torch"):
        limit = int(args.memory_limit_gib * 2**30)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--side",
                side,
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
                "--sparsity",
                str(args.sparsity),
            ],
            capture_output=True,
            text=True,
            preexec_fn=lambda limit=limit: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )
        if proc.returncode != 0:
            oom = "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower()
            reason = f"out of memory within {args.memory_limit_gib:g} GiB" if oom else "failed"
            rows[side] = {"error": f"{reason} (exit {proc.returncode})"}
        else:
            rows[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| implementation | parameters | prune step (s) | extra memory | ÷ weights | sparsity |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side, r in rows.items():
        if "error" in r:
            print(f"| {side} | | {r['error']} | | | |")
            continue
        print(
            f"| {side} | {r['params'] / 1e9:.2f} B | {r['seconds']:.1f} | "
            f"{r['extra_bytes'] / 2**30:.2f} GiB | {r['extra_over_weights']:.2f}x | "
            f"{r['sparsity']:.4f} |"
        )
    if all("error" not in r for r in rows.values()):
        ratio = rows["shears"]["seconds"] / rows["torch"]["seconds"]
        print(f"\nShears / torch.nn.utils.prune time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
