"""Width and depth pruning of a small trained Llama (issue 16): parameters, perplexity before
pruning, straight after it and after a short distillation from the dense model (the same
budget for every setting), and the delivered greedy-decode throughput.

    .venv/bin/python bench/llm_structured.py --part small   # ~10 min, 1 thread, busy 2 cores
    .venv/bin/python bench/llm_structured.py --train-minutes 1 --distill-steps 10   # smoke

The model (4 layers, hidden 128, MLP 512, 4 heads in 2 key/value groups, tied 1024-token
BPE embeddings, 64-token blocks) is trained on the standard library's source for
``--train-minutes`` and cached in ``/tmp/shears-bench-llm-structured``. Every setting starts
from that checkpoint loaded through the ``hf`` format, is pruned by the registered ``hf``
width/depth pruner (``activation``, calibrated on 32 blocks the model was not trained on),
evaluated on 64 held-out blocks, distilled (logit KL at T = 2, ``--distill-steps`` AdamW steps
of 8 blocks) and measured by the format's own ``measure`` (``tokens_per_second``: greedy
decoding at batch 1 with the KV cache, the number the job's metrics report).
``gain_per_reduction`` = (tokens/s after / before) / (params before / params after): 1.0 means
the speed grows exactly as the model shrinks.

The small model's decode step is mostly fixed per-token cost, so ``--part wide`` measures the
speed alone at a realistic width: a random-weight Llama built from its config (hidden
``--wide-hidden``, MLP 2.75x, 16 heads in 4 key/value groups, ``--wide-layers`` layers, an
untied 32,000-token vocabulary, the same 72-token context: 64 new tokens), saved and loaded
through the ``hf`` format, pruned by the same pruner for every setting (calibration on 8 random
token blocks), then dense and every pruned model measured in turn by ``measure`` (one warm-up
and one timed decode per call), ``--rounds`` times, at each of ``--wide-threads``; medians.
Random weights change no shape and no timing. ``macs_ratio`` (pruned / dense MACs per token of
a 72-token prefill) is what a compute-bound decoder would gain.

    flock /tmp/shears-bench.lock .venv/bin/python bench/llm_structured.py --part wide

``--part small`` and ``--part wide`` each keep the other part's results already in the JSON.
Writes ``docs/data/llm_structured.json`` and ``docs/img/llm_structured.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WORK = Path("/tmp/shears-bench-llm-structured")  # noqa: S108  (scratch: model and blocks)
SEQ = 64
# name -> list of (granularity, parameters) applied in order.
SETTINGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "mlp 50%": [("width", {"mlp": 0.5})],
    "mlp 50% + heads 50%": [("width", {"mlp": 0.5, "heads": 0.5})],
    "mlp 75% + heads 50%": [("width", {"mlp": 0.75, "heads": 0.5})],
    "depth 1 of 4": [("depth", {"layers": 1})],
    "depth 2 of 4": [("depth", {"layers": 2})],
    "mlp 50% + depth 1": [("width", {"mlp": 0.5}), ("depth", {"layers": 1})],
}


def prepare(minutes: float, seed: int = 0) -> dict[str, Any]:
    """Train the tokenizer and the model once; later runs reuse them from ``WORK``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.llm import _stdlib_text, shuffled_blocks, train_bpe, train_for

    meta = WORK / "meta.json"
    if meta.exists():
        return dict(json.loads(meta.read_text()))
    (WORK / "model").mkdir(parents=True, exist_ok=True)
    train_text, held_text = _stdlib_text()
    train_text, held_text = train_text[:3_000_000], held_text[:400_000]  # minutes, not hours
    (WORK / "train.txt").write_text(train_text)
    (WORK / "held.txt").write_text(held_text)
    tokenizer = train_bpe(train_text, 1024)
    eos = tokenizer.token_to_id("<eos>")
    g = torch.Generator().manual_seed(seed)
    train, held = shuffled_blocks(WORK, tokenizer, SEQ, g)
    calibration, train = train[:32], train[32:]  # calibration blocks are not trained on
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ + 8,  # the format's decode timing: context - 8 new tokens
        tie_word_embeddings=True,
        initializer_range=0.05,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    step = train_for(model, train, minutes, 3e-3, g)
    model.save_pretrained(WORK / "model")
    tokenizer.save(str(WORK / "model" / "tokenizer.json"))
    (WORK / "model" / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    torch.save(
        {"calibration": calibration, "evaluation": held[:64], "train": train}, WORK / "blocks.pt"
    )
    info = {
        "config": {
            k: v for k, v in config.to_dict().items() if k.endswith(("_size", "_layers", "_heads"))
        },
        "train_steps": step,
        "train_minutes": minutes,
        "train_blocks": int(train.shape[0]),
    }
    meta.write_text(json.dumps(info, indent=1))
    return info


def _load() -> tuple[Any, Any]:
    from core.formats import get_format

    archive = WORK / "model.tar"
    if not archive.exists():
        # The checkpoint's files at the archive's root, as `save_pretrained` wrote them.
        with tarfile.open(archive, "w") as tar:
            for member in sorted((WORK / "model").iterdir()):
                tar.add(member, arcname=member.name)
    return get_format("hf").load(archive)


def _decoder_params(net: torch.nn.Module) -> int:
    from core.pruning.llm import decoder_layers

    return sum(p.numel() for layer in decoder_layers(net) for p in layer.module.parameters())


def _size(loaded: Any, blocks: torch.Tensor) -> dict[str, float]:
    from core.formats import get_format
    from core.lm_recovery import evaluate_perplexity

    return {
        "params": get_format("hf").count_parameters(loaded),
        "decoder_params": _decoder_params(loaded.model),
        "perplexity": evaluate_perplexity(loaded.model, blocks, device="cpu")["perplexity"],
    }


def _speeds(
    models: dict[str, Any], info: Any, rounds: int, repeats: int = 3
) -> dict[str, dict[str, Any]]:
    """Median decode tokens/s and prefill ms of each model, measured in alternation so that
    the load other processes put on the machine hits every model alike."""
    import statistics

    from core.formats import get_format
    from core.formats.base import MeasureConfig

    config = MeasureConfig(batch_size=1, warmup=1, repeats=repeats)
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    macs: dict[str, int] = {}
    for index in range(rounds):
        for name, loaded in models.items():
            cost = get_format("hf").measure(loaded, info, config)
            assert cost.tokens_per_second is not None
            seen[name].append((cost.tokens_per_second, cost.latency_ms))
            macs[name] = cost.macs
            print(
                f"  round {index + 1}: {name} {cost.tokens_per_second:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return {
        name: {
            "tokens_per_second": statistics.median(t for t, _ in runs),
            "prefill_ms": statistics.median(ms for _, ms in runs),
            "tokens_per_second_runs": [t for t, _ in runs],
            "macs_per_token": macs[name],
        }
        for name, runs in seen.items()
    }


def apply_setting(
    loaded: Any, info: Any, steps: list[tuple[str, dict[str, Any]]], calibration: torch.Tensor
) -> None:
    """Prune ``loaded`` in place by the registered ``hf`` pruner, ``activation`` ranking."""
    from core.pruning import PruneContext, pruner_for
    from core.spec import PruningSpec

    for granularity, params in steps:
        spec = PruningSpec(criterion="activation", granularity=granularity, **{granularity: params})
        pruner_for("hf", granularity).prune(
            loaded, info, spec, PruneContext(calibration=(calibration,))
        )


def run_setting(
    name: str, steps: list[tuple[str, dict[str, Any]]], dense: Any, args: Any
) -> dict[str, Any]:
    from core.lm_recovery import evaluate_perplexity, fine_tune_lm
    from core.spec import FineTuneSpec

    blocks = torch.load(WORK / "blocks.pt")
    loaded, info = _load()
    start = time.perf_counter()
    apply_setting(loaded, info, steps, blocks["calibration"])
    prune_seconds = time.perf_counter() - start
    pruned = _size(loaded, blocks["evaluation"])
    speeds = _speeds({"dense": dense, "pruned": loaded}, info, args.rounds)
    fine_tune_lm(
        loaded.model,
        blocks["train"],
        FineTuneSpec(
            steps=args.distill_steps,
            batch_size=8,
            lr=1e-3,
            loss="distillation",
            temperature=2.0,
            warmup_steps=min(10, args.distill_steps // 5),
        ),
        masked=(),
        teacher=dense.model,
        device="cpu",
    )
    loaded.model.eval()
    distilled = evaluate_perplexity(loaded.model, blocks["evaluation"], device="cpu")
    loaded.close()
    speedup = speeds["pruned"]["tokens_per_second"] / speeds["dense"]["tokens_per_second"]
    print(
        f"{name}: params {pruned['params']}, ppl {pruned['perplexity']:.2f} -> "
        f"{distilled['perplexity']:.2f}, decode x{speedup:.2f}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "name": name,
        "family": "both" if len(steps) > 1 else steps[0][0],
        "steps": [{"granularity": g, g: p} for g, p in steps],
        "prune_seconds": prune_seconds,
        "after_pruning": pruned,
        "perplexity_distilled": distilled["perplexity"],
        "speed": speeds,
        "speedup": speedup,
        "prefill_speedup": speeds["dense"]["prefill_ms"] / speeds["pruned"]["prefill_ms"],
    }


def breakdown(net: torch.nn.Module) -> dict[str, int]:
    """Parameters by part: the input embedding (a lookup: no compute per token), the output
    head (its own matrix unless tied), attention and MLP of the decoder layers, the rest."""
    from core.pruning.llm import decoder_layers

    def count(module: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    embedding = net.get_input_embeddings()
    head = net.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    layers = [layer.module for layer in decoder_layers(net)]
    attention = sum(count(getattr(layer, "self_attn", None)) for layer in layers)
    mlp = sum(count(getattr(layer, "mlp", None)) for layer in layers)
    parts = {
        "embedding": count(embedding),
        "lm_head": 0 if tied else count(head),
        "attention": attention,
        "mlp": mlp,
    }
    parts["other"] = sum(p.numel() for p in net.parameters()) - sum(parts.values())
    return parts


def wide_checkpoint(hidden: int, layers: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A random-weight Llama of realistic width, saved as an ``hf`` upload (cached in WORK)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,  # Llama's ~2.7x
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=SEQ + 8,  # the small model's decode: 64 new tokens
        tie_word_embeddings=False,
    )
    summary = {
        k: v for k, v in config.to_dict().items() if k.endswith(("_size", "_layers", "_heads"))
    }
    folder = WORK / f"wide-{hidden}x{layers}"
    archive = folder / "model.tar"
    if not archive.exists():
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder / "model")
        with tarfile.open(archive, "w") as tar:
            for member in sorted((folder / "model").iterdir()):
                tar.add(member, arcname=member.name)
    return archive, summary


def wide_speed(args: Any) -> dict[str, Any]:
    """Decode throughput of every setting on a random-weight Llama of realistic width."""
    from core.formats import get_format

    hf = get_format("hf")
    archive, summary = wide_checkpoint(args.wide_hidden, args.wide_layers)
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 32000, (8, SEQ), generator=g)
    models: dict[str, Any] = {}
    sizes: dict[str, dict[str, Any]] = {}
    info = None
    for name, steps in {"dense": [], **SETTINGS}.items():
        loaded, info = hf.load(archive)
        loaded.close()  # the temporary folder is only needed to save
        apply_setting(loaded, info, steps, calibration)
        models[name] = loaded
        sizes[name] = {
            "params": hf.count_parameters(loaded),
            "decoder_params": _decoder_params(loaded.model),
            "parts": breakdown(loaded.model),
        }
        print(f"wide {name}: {sizes[name]['params']} params", file=sys.stderr, flush=True)
    assert info is not None
    by_threads = {}
    for threads in args.wide_threads:
        torch.set_num_threads(threads)
        # One timed decode per call (after one warm-up), so each round costs half as much.
        by_threads[str(threads)] = _speeds(models, info, args.rounds, repeats=1)
    torch.set_num_threads(args.threads)
    dense = sizes["dense"]
    rows = []
    for name, steps in SETTINGS.items():
        size = sizes[name]
        row: dict[str, Any] = {
            "name": name,
            "family": "both" if len(steps) > 1 else steps[0][0],
            "params": size["params"],
            "parts": size["parts"],
            "params_ratio": size["params"] / dense["params"],
            "decoder_params_ratio": size["decoder_params"] / dense["decoder_params"],
            "by_threads": {},
        }
        for threads, speeds in by_threads.items():
            speedup = speeds[name]["tokens_per_second"] / speeds["dense"]["tokens_per_second"]
            macs_ratio = speeds[name]["macs_per_token"] / speeds["dense"]["macs_per_token"]
            row["by_threads"][threads] = {
                "speed": speeds[name],
                "speedup": speedup,
                "macs_ratio": macs_ratio,
                "gain_per_reduction": speedup * row["params_ratio"],
                "gain_per_macs_reduction": speedup * macs_ratio,
                "prefill_speedup": speeds["dense"]["prefill_ms"] / speeds[name]["prefill_ms"],
            }
        rows.append(row)
    return {
        "config": summary,
        "weights": "random (speed only), fp32",
        "calibration": "8 blocks of 64 random token ids",
        "threads": args.wide_threads,
        "speed_rounds": args.rounds,
        "dense": {**dense, "speed": {t: v["dense"] for t, v in by_threads.items()}},
        "settings": rows,
    }


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = data["dense"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"width": "tab:blue", "depth": "tab:orange", "both": "tab:green"}
    for row in data["settings"]:
        x = row["params_ratio"]
        c = colors[row["family"]]
        left.scatter(x, row["after_pruning"]["perplexity"], color=c, marker="x")
        left.scatter(x, row["perplexity_distilled"], color=c, marker="o")
        left.plot([x, x], [row["after_pruning"]["perplexity"], row["perplexity_distilled"]], c=c)
        left.annotate(row["name"], (x, row["perplexity_distilled"]), fontsize=7)
        right.scatter(1 / x, row["speedup"], color=c, marker="o")
        right.annotate(row["name"], (1 / x, row["speedup"]), fontsize=7)
    wide = data.get("wide")
    if wide:
        threads = str(wide["threads"][0])
        for row in wide["settings"]:
            x, y = 1 / row["params_ratio"], row["by_threads"][threads]["speedup"]
            right.scatter(x, y, color=colors[row["family"]], marker="s", facecolors="none")
            right.annotate(row["name"], (x, y), fontsize=6, color="dimgray")
    left.scatter(1.0, dense["perplexity"], color="black", marker="*", s=80, label="dense")
    for family, c in colors.items():
        left.scatter([], [], color=c, label=family)
    left.scatter([], [], color="gray", marker="x", label="pruned")
    left.scatter([], [], color="gray", marker="o", label=f"+ {data['distill_steps']} distill steps")
    left.set_yscale("log")
    left.set_xlabel("parameters (x dense)")
    left.set_ylabel("held-out perplexity")
    left.legend(fontsize=7)
    rows = data["settings"] + (wide["settings"] if wide else [])
    top = max(1 / r["params_ratio"] for r in rows) * 1.1
    right.plot([1, top], [1, top], "k--", lw=0.8, label="gain = reduction")
    right.plot([1, top], [0.8, 0.8 * top], "k:", lw=0.8, label="goal: gain = 0.8 x reduction")
    right.scatter([], [], color="gray", marker="o", label="trained hidden-128 model")
    if wide:
        cfg = wide["config"]
        right.scatter(
            [],
            [],
            color="gray",
            marker="s",
            facecolors="none",
            label=f"random hidden-{cfg['hidden_size']} model, {cfg['num_hidden_layers']} layers",
        )
    right.set_xlabel("parameter reduction (dense / pruned)")
    right.set_ylabel("decode tokens/s gain (pruned / dense)")
    right.legend(fontsize=7)
    fig.suptitle(
        "Width and depth pruning of 4-layer Llamas (1 thread on a shared 2-core CPU, medians)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def small(args: Any) -> dict[str, Any]:
    """Train (or reuse) the small model, prune, distil and time every setting."""
    meta = prepare(args.train_minutes)
    blocks = torch.load(WORK / "blocks.pt")
    dense_model, _ = _load()
    dense = _size(dense_model, blocks["evaluation"])
    print(f"dense: {dense}", file=sys.stderr, flush=True)
    rows = []
    for name, steps in SETTINGS.items():
        row = run_setting(name, steps, dense_model, args)
        after = row["after_pruning"]
        row["params_ratio"] = after["params"] / dense["params"]
        row["decoder_params_ratio"] = after["decoder_params"] / dense["decoder_params"]
        row["gain_per_reduction"] = row["speedup"] * row["params_ratio"]
        rows.append(row)
    dense["parts"] = breakdown(dense_model.model)
    dense_model.close()
    return {
        "model": meta,
        "distill_steps": args.distill_steps,
        "speed_rounds": args.rounds,
        "threads": args.threads,
        "dense": dense,
        "settings": rows,
        "note": "one run on a 2-core machine shared with other work: speed ratios are noisy",
    }


def main() -> None:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "small", "wide"), default="all")
    parser.add_argument("--train-minutes", type=float, default=4.0)
    parser.add_argument("--distill-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="paired speed measurements")
    parser.add_argument("--wide-hidden", type=int, default=1024)
    parser.add_argument("--wide-layers", type=int, default=4)
    parser.add_argument(
        "--wide-threads", type=lambda v: [int(t) for t in v.split(",")], default=[1]
    )
    parser.add_argument("--work", type=Path, default=WORK, help="where the model is cached")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/data/llm_structured.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/llm_structured.png")
    args = parser.parse_args()
    WORK = args.work
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.part in ("all", "small"):
        data.update(small(args))
        data["total_minutes"] = (time.perf_counter() - started) / 60
    if args.part in ("all", "wide"):
        begun = time.perf_counter()
        data["wide"] = wide_speed(args)
        data["wide"]["minutes"] = (time.perf_counter() - begun) / 60
    # 1, 5 and 15-minute load averages of the machine (2 cores) when the part began and ended.
    data.setdefault("load_average", {})[args.part] = {
        "before": load_before,
        "after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.plot)
    dense = data["dense"]
    for row in data["settings"]:
        print(
            f"{row['name']:>22}: params x{row['params_ratio']:.2f} "
            f"(layers x{row['decoder_params_ratio']:.2f}), ppl {dense['perplexity']:.1f} -> "
            f"{row['after_pruning']['perplexity']:.1f} -> {row['perplexity_distilled']:.1f}, "
            f"decode x{row['speedup']:.2f}, gain/reduction {row['gain_per_reduction']:.2f}"
        )
    for row in data.get("wide", {}).get("settings", []):
        for threads, at in row["by_threads"].items():
            print(
                f"{'wide ' + row['name']:>27} ({threads} thr): params x{row['params_ratio']:.2f},"
                f" MACs x{at['macs_ratio']:.2f}, decode x{at['speedup']:.2f}, "
                f"gain/reduction {at['gain_per_reduction']:.2f}, "
                f"gain/MAC reduction {at['gain_per_macs_reduction']:.2f}"
            )


if __name__ == "__main__":
    main()
