"""Where Shears' SparseGPT spends its time on one decoder layer (issue 13): wall seconds per phase.

    .venv/bin/python bench/llm_phases.py                                   # half the 1 B widths
    .venv/bin/python bench/llm_phases.py --hidden 2048 --intermediate 5632 --heads 32 --kv-heads 4

A one-layer Llama from a config (random float32 weights, seed 0; ``--layers`` for more, each but
the last then has its output pass), 16 random blocks of 512 tokens, 50% unstructured (``--n-m``
for 2:4), 2 threads (``--threads``), SparseGPT (``--criterion wanda`` for Wanda). The functions of
``core.pruning.llm`` are wrapped by name where they exist, so the same script times older code
too (run it from a checkout of that code). "calibration forwards" is the rest of the calibration
passes: what the layer's own forwards take besides the Hessian hooks. ``--save`` writes the
pruned weights for comparison.

``--memory`` also gives each phase's peak RSS above the baseline (the model built, the heap's
free pages given back): at every entry to and exit from a wrapped function the kernel's
high-water mark is read, credited to the innermost phase running since the last such point,
and reset (``/proc/self/clear_refs``), so the peaks are exact, not sampled. "outside the phases"
is the rest of ``prune_causal_lm``: the layer's output pass, among others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.llm import _reset_peak, _status_kib, add_widths

T: defaultdict[str, float] = defaultdict(float)
OUTSIDE = "outside the phases"


class PeakByPhase:
    """The high-water mark of RSS (KiB) credited to the innermost phase running."""

    def __init__(self) -> None:
        self.stack = [OUTSIDE]
        self.peak_kib: defaultdict[str, int] = defaultdict(int)
        self.timeline: list[tuple[str, int, int]] = []  # (phase, RSS at its start, its peak)
        self.on = False
        self.start_kib = 0

    def boundary(self) -> None:
        if self.on:
            label = self.stack[-1]
            peak = _status_kib("VmHWM")
            self.peak_kib[label] = max(self.peak_kib[label], peak)
            self.timeline.append((label, self.start_kib, peak))
            _reset_peak()
            self.start_kib = _status_kib("VmRSS")


MEMORY = PeakByPhase()


def _timed(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        MEMORY.boundary()
        MEMORY.stack.append(label)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            T[label] += time.perf_counter() - start
            MEMORY.boundary()
            MEMORY.stack.pop()

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_widths(p, (1024, 2816, 16, 2), samples=16)
    p.add_argument("--n-m", action="store_true", help="2:4 instead of 50%% unstructured")
    p.add_argument("--save", default=None)
    p.add_argument("--memory", action="store_true", help="peak extra RSS per phase (MiB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1, help="decoder layers (the last: no output)")
    p.add_argument("--criterion", default="sparsegpt", choices=["sparsegpt", "wanda"])
    p.add_argument("--memory-budget-mib", type=float, default=None, help="prune_causal_lm's")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    import core.pruning.llm  # noqa: F401  (the submodules below, not the re-exported functions)

    seq_mod = sys.modules["core.pruning.llm.sequential"]
    sgpt_mod = sys.modules["core.pruning.llm.sparsegpt"]
    masks_mod = sys.modules["core.pruning.llm.masks"]
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 8000, (a.samples, a.seq), generator=torch.Generator().manual_seed(1))
    for owner, name, label in [
        (seq_mod, "capture_inputs", "capture first-layer inputs"),
        (seq_mod, "input_groups", "group linears by input"),
        (seq_mod, "_probe", "group linears by input"),
        (seq_mod, "_collect", "calibration passes"),
        (seq_mod, "_collect_hessian", "calibration passes"),
        (seq_mod, "_collect_hessians", "calibration passes"),
        (masks_mod.Hessian, "__call__", "Hessian accumulation (X Xᵀ)"),
        (seq_mod, "inverse_hessian_", "Cholesky / inverse"),
        (seq_mod, "sweep", "OBS sweep"),
        (sgpt_mod, "_block_mask", "of which mask selection"),
        (sgpt_mod, "_run_mask", "of which mask selection"),
        (seq_mod, "error_on_data", "reconstruction-error report"),
        (seq_mod, "_collect_norms", "Wanda's statistics pass"),
        (masks_mod, "row_mask", "row masks"),
        (seq_mod.LayerInputs, "advance", "output passes"),
    ]:
        _timed(owner, name, label)
    from core.pruning.llm import prunable_linears, prune_causal_lm

    ratios = dict.fromkeys(prunable_linears(model), 0.5)
    baseline = 0
    if a.memory:
        from core.allocator import release_free_memory

        release_free_memory()
        baseline = _status_kib("VmRSS")
        _reset_peak()
        MEMORY.start_kib = baseline
        MEMORY.on = True
    start = time.perf_counter()
    budget = {}  # only passed when set: older code may have no such parameter
    if a.memory_budget_mib is not None:
        budget["memory_budget"] = int(a.memory_budget_mib * 2**20)
    results = prune_causal_lm(
        model,
        ratios,
        criterion=a.criterion,
        input_ids=ids,
        n_m=(2, 4) if a.n_m else None,
        **budget,
    )
    total = time.perf_counter() - start
    MEMORY.boundary()
    MEMORY.on = False
    phases = {k: round(v, 2) for k, v in T.items()}
    if "calibration passes" in phases:
        passes = phases.pop("calibration passes")
        phases["calibration forwards"] = round(passes - T["Hessian accumulation (X Xᵀ)"], 2)
    print(
        json.dumps(
            {
                "total_seconds": round(total, 2),
                "phases_seconds": phases,
                "peak_extra_mib": {
                    k: round((v - baseline) / 1024) for k, v in MEMORY.peak_kib.items()
                },
                "timeline_extra_mib": [
                    (k, round((a - baseline) / 1024), round((b - baseline) / 1024))
                    for k, a, b in MEMORY.timeline
                ],
                "errors": {k: r.error for k, r in results.items()},
                "load_average_1min": os.getloadavg()[0],
                "args": vars(a),
            }
        )
    )
    if a.save:
        weights = {
            n: m.weight.detach().clone()
            for n, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        torch.save(weights, a.save)


if __name__ == "__main__":
    main()
