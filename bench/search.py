"""Ratios found automatically (issue 14): accuracy at equal MACs of five ways to choose per-layer
ratios, before and after an equal fine-tune budget; and the sensitivity scan's wall time with one
and two Celery workers.

    .venv/bin/python -m bench.search quality            # 40 min on 2 cores at load 13-20
    .venv/bin/python -m bench.search quality --seeds 3 4 --out more.json   # more seeds, apart
    .venv/bin/python -m bench.search table docs/data/search_quality.json more.json
    .venv/bin/python -m bench.search scan               # starts the service twice
    # results: docs/benchmarks.md ("Ratios found automatically")

Quality: small CNNs trained on scikit-learn's 8x8 digits (a plain CNN and a residual one), pruned
to at most a MACs budget by
- uniform: one channel ratio for every group (the largest that meets the budget);
- global: Shears' `scope: global` ranking (scores normalised per group), ratio bisected;
- Torch-Pruning: `MetaPruner(GroupMagnitudeImportance(p=2), global_pruning=True)`, ratio bisected;
- LAMP: layer-adaptive magnitude (Lee et al. 2021) over channels: within each group a channel
  scores its squared L2 norm over the sum of those of every channel at least as large, the
  scores are ranked globally and the lowest removed until the budget is met (`lamp_ratios`);
- search: Shears' sensitivity scan (each group alone at 0.1..0.9, loss on 512 training samples,
  BatchNorm re-estimated) and the greedy allocation of `pruning.target: {"macs": b}`.
All five rank channels by magnitude (l2, Torch-Pruning's group L2) so the comparison is about
*allocation*. Accuracy on the held-out quarter: straight after pruning; after re-estimating the
BatchNorm statistics on the 512 search samples (what a target job does, since its scan scored
every cell that way; applied to every method alike); and after the same fine-tune from the raw
pruned model (AdamW, lr 1e-3, 3 epochs, batch 64, BatchNorm in training mode), per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.finetune import set_training
from core.formats.pt2.program import module_on, synthetic_inputs
from core.importance import lamp_scores
from core.metrics import count_macs
from core.search import Scanner, reestimate_batchnorm, with_ratios
from core.search.allocate import allocate_to_budget, uniform_to_budget
from core.search.cost import CostModel
from core.search.targets import curves_from_cells
from core.search.units import ScanUnit
from core.spec import JobSpec, PruningSpec
from core.structure import analyze, prune_program
from core.structure.importance import group_scores
from examples.models import (
    ResidualCNN,
    accuracy,
    digits_arrays,
    export_digits,
    save_npz,
    train_digits_cnn,
)
from examples.peers import macs_fraction, torch_pruning_global

Program = torch.export.ExportedProgram


def train_residual(x, y, epochs: int = 12, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ResidualCNN(width=16)
    _train(model, x, y, epochs, 3e-3, seed)
    return model.eval()


def _train(model: nn.Module, x, y, epochs: int, lr: float, seed: int, eager: bool = True) -> None:
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    if eager:  # an exported graph fixes the mode in its nodes instead (set_training)
        model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(yt), 64):
            rows = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[rows]), yt[rows]).backward()
            optimizer.step()


def macs_of(program: Program, info) -> int:
    module = module_on(program)
    inputs = synthetic_inputs(info.inputs, 1)
    return count_macs(lambda: module(*inputs), 1)


def fine_tuned_accuracy(module: nn.Module, exported: bool, data, seed: int) -> float:
    """The same fine-tune for every method; an exported module switches its BatchNorm nodes."""
    x, y, x_test, y_test = data
    if exported:
        set_training(module, True)  # type: ignore[arg-type]
    _train(module, x, y, 3, 1e-3, seed, eager=not exported)
    if exported:
        set_training(module, False)  # type: ignore[arg-type]
    else:
        module.eval()
    return accuracy(module, x_test, y_test)


def eager_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy whose BatchNorm statistics are those of ``x`` (what Shears does to a program)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch gives its own statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def lamp_ratios(
    program: Program, spec: PruningSpec, units: list[ScanUnit], cost: CostModel, budget: float
) -> dict[str, float]:
    """LAMP's allocation, for channels: per group, ``s_u / sum(s_v, s_v >= s_u)`` over the l2
    criterion's per-channel scores ``s`` (squared norms, so this is LAMP of the channel norms);
    one global ranking of those; the fewest lowest-scored channels whose removal meets
    ``budget`` (a fraction of the MACs, by the search's exact cost model). Each group keeps
    one channel, as Shears' pruner does. Which channels go inside a group is the l2 order
    either way: LAMP's score rises with the norm within a group."""
    gm = program.module()
    analysis = analyze(gm)
    scores = group_scores(gm, analysis, spec.model_copy(update={"criterion": "l2"}))
    by_first = {g.layers[0]: scores[g.id] for g in analysis.groups}
    ranked: list[tuple[float, str]] = []
    for unit in units:
        score = by_first[unit.key]
        assert score is not None, unit
        assert len(score) == unit.size, unit
        lamp = lamp_scores(score.clamp_min(0).sqrt())
        # The largest channel of a group always scores 1 and is never reached: one stays.
        ranked += [(float(v), unit.key) for v in sorted(lamp.tolist())[:-1]]
    ranked.sort()

    def ratios_at(k: int) -> dict[str, float]:
        removed = dict.fromkeys((u.key for u in units), 0)
        for _, key in ranked[:k]:
            removed[key] += 1
        return {u.key: removed[u.key] / u.size for u in units}

    lo, hi = 0, len(ranked)  # the fewest removals that meet the budget (cost falls with k)
    if cost.fraction("macs", ratios_at(hi)) > budget:
        raise ValueError(f"LAMP cannot reach {budget} of the MACs")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if cost.fraction("macs", ratios_at(mid)) > budget else (lo, mid)
    return ratios_at(lo)


def bisect(measure: Callable[[float], float], budget: float, top: float = 0.95) -> float:
    """The largest ratio whose MAC fraction is within ``budget`` (measure is monotone)."""
    lo, hi = 0.0, top
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(mid) > budget else (lo, mid)
    return hi


def one_run(name: str, net: nn.Module, head: str, data, budget: float, seed: int, root: Path):
    x, y, x_test, y_test = data
    path = export_digits(net, root / f"{name}.pt2")
    search_data = save_npz(root / "search.npz", inputs=x[:512], targets=y[:512])
    spec = JobSpec.model_validate(
        {"pruning": {"criterion": "l2", "granularity": "channel", "target": {"macs": budget}}}
    )
    scanner = Scanner.open(spec, path, search_data)
    dense_macs = macs_of(scanner.program, scanner.info)
    rows: dict[str, dict[str, float]] = {}

    calibration = (torch.as_tensor(x[:512]),)

    def record(method: str, program: Program, seconds: float) -> None:
        pruned = accuracy(program.module(), x_test, y_test)
        recalibrated = module_on(program)
        reestimate_batchnorm(recalibrated, calibration)
        tuned = fine_tuned_accuracy(module_on(program), True, data, seed)
        rows[method] = {
            "macs": macs_of(program, scanner.info) / dense_macs,
            "after_pruning": pruned,
            "after_bn": accuracy(recalibrated, x_test, y_test),
            "after_fine_tune": tuned,
            "seconds": seconds,
        }

    def prune(ratios: dict[str, float]) -> Program:
        return prune_program(scanner.program, with_ratios(spec.pruning, ratios)).program

    start = time.perf_counter()
    baseline = scanner.score(None, 0.0)
    keys = [u.key for u in scanner.units()]
    cells = {(k, r): scanner.score(k, r) for k in keys for r in scanner.grid}
    curves = curves_from_cells(keys, baseline, cells, "loss", higher_is_better=False)
    cost = scanner.cost_model()
    chosen = allocate_to_budget(
        curves, lambda r: cost.fraction("macs", r), budget, sizes=cost.sizes
    )
    record("search", prune(chosen.ratios), time.perf_counter() - start)

    # The same search ranking channels by group_l2 (every coupled tensor, norms folded in, as
    # Torch-Pruning's group importance): the allocation is the search's, the order within a
    # group the peer's kind.
    start = time.perf_counter()
    grouped = JobSpec.model_validate(
        {"pruning": {"criterion": "group_l2", "granularity": "channel", "target": {"macs": budget}}}
    )
    group_scanner = Scanner.open(grouped, path, search_data)
    group_base = group_scanner.score(None, 0.0)
    group_cells = {(k, r): group_scanner.score(k, r) for k in keys for r in group_scanner.grid}
    group_curves = curves_from_cells(keys, group_base, group_cells, "loss", higher_is_better=False)
    group_choice = allocate_to_budget(
        group_curves, lambda r: cost.fraction("macs", r), budget, sizes=cost.sizes
    )
    record(
        "search_group_l2",
        prune_program(scanner.program, with_ratios(grouped.pruning, group_choice.ratios)).program,
        time.perf_counter() - start,
    )

    start = time.perf_counter()
    uniform = uniform_to_budget(keys, lambda r: cost.fraction("macs", r), budget)
    record("uniform", prune(dict.fromkeys(keys, uniform)), time.perf_counter() - start)

    start = time.perf_counter()
    lamp = lamp_ratios(scanner.program, spec.pruning, scanner.units(), cost, budget)
    record("lamp", prune(lamp), time.perf_counter() - start)

    start = time.perf_counter()

    def global_at(ratio: float) -> Program:
        plain = PruningSpec(criterion="l2", granularity="channel", sparsity=ratio, scope="global")
        return prune_program(scanner.program, plain).program

    ratio = bisect(lambda r: macs_of(global_at(r), scanner.info) / dense_macs, budget)
    record("global", global_at(ratio), time.perf_counter() - start)

    start = time.perf_counter()
    peer = torch_pruning_global(net, head, budget)
    seconds = time.perf_counter() - start
    rows["torch_pruning"] = {
        "macs": macs_fraction(peer, net),
        "after_pruning": accuracy(peer, x_test, y_test),
        "after_bn": accuracy(eager_batchnorm(peer, calibration[0]), x_test, y_test),
        "after_fine_tune": fine_tuned_accuracy(peer, False, data, seed),
        "seconds": seconds,
    }
    rows["dense"] = {"macs": 1.0, "after_pruning": accuracy(net, x_test, y_test)}
    return rows, chosen.ratios


def quality(seeds: list[int], budgets: list[float], out: Path) -> None:
    torch.set_num_threads(1)
    results = []
    for seed in seeds:
        data = digits_arrays(seed)
        x, y = data[0], data[1]
        for name, head in (("digits_cnn", "fc"), ("residual_cnn", "head")):
            net = (
                train_digits_cnn(x, y, epochs=12, seed=seed)
                if name == "digits_cnn"
                else train_residual(x, y, seed=seed)
            )
            for budget in budgets:
                with tempfile.TemporaryDirectory() as tmp:
                    rows, chosen = one_run(name, net, head, data, budget, seed, Path(tmp))
                entry = {
                    "model": name,
                    "seed": seed,
                    "budget": budget,
                    "rows": rows,
                    "chosen": chosen,
                }
                results.append(entry)
                print(json.dumps(entry), flush=True)
    out.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    print(
        "| model | MACs budget | method | MACs | after pruning | + BatchNorm re-estimated | "
        "after fine-tune | search − method: after pruning, + BN, after fine-tune (mean, points) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    keys = sorted({(r["model"], r["budget"]) for r in results}, key=lambda k: (k[0], -k[1]))
    for model, budget in keys:
        runs = [r for r in results if r["model"] == model and r["budget"] == budget]
        methods = ("search", "search_group_l2", "torch_pruning", "lamp", "global", "uniform")
        for method in (*methods, "dense"):
            values = [r["rows"][method] for r in runs if method in r["rows"]]
            if not values:
                continue

            def med(k: str, values: list[dict[str, float]] = values) -> float:
                return statistics.median(v[k] for v in values if k in v)

            diff = ""
            if method not in ("search", "dense") and all(method in r["rows"] for r in runs):
                d1 = statistics.mean(
                    r["rows"]["search"]["after_pruning"] - r["rows"][method]["after_pruning"]
                    for r in runs
                )
                d2 = statistics.mean(
                    r["rows"]["search"]["after_fine_tune"] - r["rows"][method]["after_fine_tune"]
                    for r in runs
                )
                d3 = statistics.mean(
                    r["rows"]["search"]["after_bn"] - r["rows"][method]["after_bn"] for r in runs
                )
                diff = f"{100 * d1:+.2f}, {100 * d3:+.2f}, {100 * d2:+.2f}"
            tuned = f"{100 * med('after_fine_tune'):.2f}%" if method != "dense" else "—"
            bn = f"{100 * med('after_bn'):.2f}%" if method != "dense" else "—"
            print(
                f"| {model} | {budget} | {method} | {med('macs'):.3f} | "
                f"{100 * med('after_pruning'):.2f}% | {bn} | {tuned} | {diff} |"
            )


def scan(workers_list: list[int], out: Path) -> None:
    """Wall time of a ``sensitivity_only`` job (the scan alone) with 1 and 2 worker processes."""
    from examples.processes import Service, free_port, service_env
    from shears.cli import worker_command

    x, y, _, _ = digits_arrays(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        net = train_residual(x, y, epochs=2)
        model = export_digits(net, root / "res.pt2")
        data = save_npz(root / "d.npz", inputs=x[:512], targets=y[:512])
        for workers in workers_list:
            data_dir = root / f"svc{workers}"
            data_dir.mkdir()
            port = free_port()
            env = service_env(data_dir, port, None, None)
            svc = Service(data_dir=data_dir, env=env, port=port, with_worker=False)
            try:
                svc.start()
                for i in range(workers):
                    svc._spawn(f"worker{i}", worker_command(env["SHEARS_QUEUE"]))
                ids = {}
                for key, path, kind in (("model", model, "models"), ("data", data, "datasets")):
                    with path.open("rb") as f:
                        ids[key] = svc.client.post(
                            f"/v1/{kind}", files={"file": (path.name, f)}
                        ).json()["id"]
                time.sleep(5)  # the workers connect to the broker
                body = {
                    "model_id": ids["model"],
                    "sensitivity_only": True,
                    "pruning": {
                        "criterion": "l2",
                        "granularity": "channel",
                        "target": {"macs": 0.5},
                        "search": {
                            "dataset_id": ids["data"],
                            "grid": [round(0.05 * i, 2) for i in range(1, 20)],
                        },
                    },
                }
                job = svc.client.post("/v1/jobs", json=body).json()
                done = svc.wait_for_job(job["id"], timeout=1200)
                assert done["status"] == "succeeded", done
                items = svc.client.get(
                    f"/v1/jobs/{job['id']}/events", params={"limit": 1000}
                ).json()["items"]
                scanned = [e for e in items if e["message"].startswith("scanned ")]
                started = next(e for e in items if e["message"].startswith("attempt"))
                from datetime import datetime

                wall = (
                    datetime.fromisoformat(done["finished_at"])
                    - datetime.fromisoformat(started["at"])
                ).total_seconds()
                names = sorted({w for e in scanned for w in e["data"]["workers"]})
                entry = {
                    "workers": workers,
                    "cells": len(scanned) * 19,
                    "wall_s": wall,
                    "names": names,
                }
                results.append(entry)
                print(json.dumps(entry), flush=True)
            finally:
                svc.stop()
    out.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    q.add_argument("--out", type=Path, default=Path("docs/data/search_quality.json"))
    t = sub.add_parser("table", help="the table of one or more quality runs' JSON, together")
    t.add_argument("files", type=Path, nargs="+")
    s = sub.add_parser("scan")
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    s.add_argument("--out", type=Path, default=Path("docs/data/search_scan.json"))
    args = parser.parse_args()
    if args.what == "quality":
        quality(args.seeds, args.budgets, args.out)
    elif args.what == "table":
        print_table([entry for f in args.files for entry in json.loads(f.read_text())])
    else:
        scan(args.workers, args.out)


if __name__ == "__main__":
    main()
