"""Language-model pruning benchmarks (issue 13): Shears' Wanda and SparseGPT vs the Wanda authors'
reference code on one trained model, and Shears at >= 1B parameters on this CPU.

    # quality, time and memory vs the reference (a checkout of github.com/locuslab/wanda, not
    # committed here): trains a small Llama on the standard library's source first (~4 min)
    .venv/bin/python bench/llm.py quality --reference /tmp/wanda-ref

    # scale: a Llama built from a config (random fp32 weights), sequential calibration
    .venv/bin/python bench/llm.py scale --method wanda
    .venv/bin/python bench/llm.py scale --method sparsegpt --layers 4

Every prune runs in its own process (``torch.set_num_threads(2)``; ``scale --threads`` to
change it). Extra memory = peak RSS during the prune call - RSS just before it (VmHWM after
resetting it through /proc/self/clear_refs, minus VmRSS), so the model's own weights and the
calibration ids are not counted.

Where Shears' per-row Wanda counts differ from the peers' (Shears removes ``round(s x in)``
weights of a row, the peers ``int(s x in)``), the quality table gets a control row,
``shears-peer-counts``: Shears asked for the peers' counts, and its masks compared with theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WORK = Path("/tmp/shears-bench-llm")  # noqa: S108  (scratch: model, blocks, pruned weights)
SETTINGS = {"50%": (0.5, None), "70%": (0.7, None), "2:4": (0.5, (2, 4))}
# Shears asked for the per-row counts the Wanda peers remove (see ``prune_shears``).
PEER_COUNTS = "shears-peer-counts"


# -- measuring -------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def measured(fn: Any) -> dict[str, float]:
    """Wall time and extra peak RSS (MiB) of ``fn()``. The heap's free pages go back to the OS
    first, so the baseline counts what is live, not what building the model left free (which
    the prune could reuse unseen: up to ~70 MiB of run-to-run spread at the 1 B widths)."""
    from core.allocator import release_free_memory

    release_free_memory()
    before = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_mib": (_status_kib("VmHWM") - before) / 1024}


def load_resident(path: Path) -> Any:
    """``LlamaForCausalLM.from_pretrained(path)`` with every weight copied out of the
    memory-mapped safetensors file into the process's own memory. Loaded weights are pages of
    the file, resident only once read: the prune's first forward would page them in and count
    the model's own decoder weights as its extra memory (~11 MiB of the 4.9 M model's, for
    every implementation alike)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def prune_shears(
    model: Any,
    calibration: torch.Tensor,
    method: str,
    sparsity: float,
    n_m: Any,
    memory_budget: int | None = None,
    peer_counts: bool = False,
):
    from core.pruning.llm import prunable_linears, prune_causal_lm

    ratios = {name: sparsity for name in prunable_linears(model)}
    if peer_counts:
        # The peers remove int(s x in) weights of a row, Shears round(s x in): this asks Shears
        # for the peers' count of every linear, a control for what that difference alone costs.
        ratios = {
            name: int(sparsity * lin.in_features) / lin.in_features
            for name, lin in model.named_modules()
            if name in ratios
        }
    # Only passed when set: the code before the 2026-12-03 rework has no such parameter.
    budget = {} if memory_budget is None else {"memory_budget": memory_budget}
    return lambda: prune_causal_lm(
        model, ratios, criterion=method, n_m=n_m, input_ids=calibration, **budget
    )


def prune_ref(
    model: Any, calibration: torch.Tensor, method: str, sparsity: float, n_m: Any, ref: str
):
    from bench.llm_peer import load_reference, prune_reference

    load_reference(ref)  # imported before the baseline, as Shears' modules are

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per linear
            prune_reference(model, ref, calibration, method, sparsity, n_m)

    return run


# -- the small trained model -----------------------------------------------------------------------


def _stdlib_text() -> tuple[str, str]:
    """Training text and held-out text: the standard library's own source (NOTES fact 8)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 20_000)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    held = texts[::10]  # every tenth file is held out
    train = [t for i, t in enumerate(texts) if i % 10]
    return "\n\n".join(train), "\n\n".join(held)


def train_bpe(text: str, vocab_size: int) -> Any:
    """A byte-level BPE trained on ``text`` (documents split at blank lines), ``<eos>`` special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tokenizer


def name_eos(folder: Path) -> None:
    """The tokenizer files beside ``tokenizer.json`` that name ``<eos>`` (what the service reads
    the EOS token from)."""
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))


def tar_folder(folder: Path, out: Path) -> Path:
    """``folder``'s files at the root of the tar ``out``, as an upload of a checkpoint."""
    with tarfile.open(out, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return out


def shuffled_blocks(
    work: Path, tokenizer: Any, seq: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) blocks of ``seq`` tokens from ``work``'s train.txt and held.txt,
    documents joined with ``<eos>``, each in a random order."""
    from core.text import token_blocks

    eos = tokenizer.token_to_id("<eos>")
    train = token_blocks(work / "train.txt", tokenizer, seq, eos)
    held = token_blocks(work / "held.txt", tokenizer, seq, eos)
    return (
        train[torch.randperm(train.shape[0], generator=g)],
        held[torch.randperm(held.shape[0], generator=g)],
    )


def train_for(
    model: Any, train: torch.Tensor, minutes: float, lr: float, g: torch.Generator
) -> int:
    """AdamW on random batches of 16 ``train`` blocks for ``minutes``; the steps taken. The
    model is left in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        idx = torch.randint(0, train.shape[0], (16,), generator=g)
        loss = model(input_ids=train[idx], labels=train[idx], use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    return step


def prepare(minutes: float, seed: int = 0) -> dict[str, Any]:
    """Train the tokenizer and the model once; later runs reuse them from ``WORK``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.lm_recovery import evaluate_perplexity

    meta = WORK / "meta.json"
    if meta.exists():
        return json.loads(meta.read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    train_text, held_text = _stdlib_text()
    (WORK / "train.txt").write_text(train_text)
    (WORK / "held.txt").write_text(held_text)
    tokenizer = train_bpe(train_text, 4096)
    tokenizer.save(str(WORK / "tokenizer.json"))
    seq = 128
    g = torch.Generator().manual_seed(seed)
    train, held = shuffled_blocks(WORK, tokenizer, seq, g)
    calibration, train = train[:64], train[64:]  # calibration blocks are not trained on
    evaluation = held[:64]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        initializer_range=0.05,
    )
    model = LlamaForCausalLM(config)
    step = train_for(model, train, minutes, 2e-3, g)
    model.save_pretrained(WORK / "model")
    torch.save({"calibration": calibration, "evaluation": evaluation}, WORK / "blocks.pt")
    dense = evaluate_perplexity(model, evaluation, device="cpu")["perplexity"]
    info = {
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": step,
        "train_minutes": minutes,
        "train_tokens": int(train.numel()),
        "calibration": list(calibration.shape),
        "evaluation": list(evaluation.shape),
        "dense_perplexity": dense,
    }
    meta.write_text(json.dumps(info, indent=1))
    return info


def _quality_one(impl: str, method: str, setting: str, repeats: int, ref: str) -> dict[str, Any]:
    """One implementation, one setting, in this process: ``repeats`` prunes of a freshly loaded
    model; the last pruned decoder-layer weights are saved for the parent to score."""
    torch.set_num_threads(2)
    blocks = torch.load(WORK / "blocks.pt")
    sparsity, n_m = SETTINGS[setting]
    runs = []
    for _ in range(repeats):
        model = load_resident(WORK / "model")
        args = (model, blocks["calibration"], method, sparsity, n_m)
        if impl in ("shears", PEER_COUNTS):
            fn = prune_shears(*args, peer_counts=impl == PEER_COUNTS)
        elif impl == "reference":
            fn = prune_ref(*args, ref)
        else:
            fn = prune_llmc(*args)
        runs.append(measured(fn))
    weights = {
        name: mod.weight.detach().clone()
        for name, mod in model.model.layers.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    torch.save(weights, WORK / f"pruned-{impl}-{method}-{setting.replace(':', '_')}.pt")
    return {
        "impl": impl,
        "method": method,
        "setting": setting,
        "seconds": [r["seconds"] for r in runs],
        "extra_mib": [r["extra_mib"] for r in runs],
        "load_average_1min": os.getloadavg()[0],  # the machine is shared: say how busy it was
    }


def prune_llmc(model: Any, calibration: torch.Tensor, method: str, sparsity: float, n_m: Any):
    import llmcompressor  # noqa: F401  (imported before the baseline)

    from bench.llm_peer import prune_llmcompressor

    return lambda: prune_llmcompressor(model, calibration, method, sparsity, n_m)


def _score(impls: list[str], method: str, setting: str) -> dict[str, dict[str, float]]:
    """Perplexity (core.lm_recovery.evaluate_perplexity, held-out blocks), sparsity of the
    decoder linears, and the share of positions whose zero/non-zero state equals Shears'."""
    from transformers import LlamaForCausalLM

    from core.lm_recovery import evaluate_perplexity

    torch.set_num_threads(2)
    blocks = torch.load(WORK / "blocks.pt")
    tag = f"{method}-{setting.replace(':', '_')}.pt"
    pruned = {i: torch.load(WORK / f"pruned-{i}-{tag}") for i in impls}
    out: dict[str, dict[str, float]] = {}
    for impl in impls:
        model = LlamaForCausalLM.from_pretrained(WORK / "model").eval()
        w = pruned[impl]
        for name, mod in model.model.layers.named_modules():
            if name in w:
                mod.weight.data.copy_(w[name])
        zeros = sum(int((t == 0).sum()) for t in w.values())
        total = sum(t.numel() for t in w.values())
        others = ["shears"]
        if impl == PEER_COUNTS:  # the control: does it remove what the peers remove?
            others += [p for p in impls if p not in ("shears", PEER_COUNTS)]
        out[impl] = {
            "perplexity": evaluate_perplexity(model, blocks["evaluation"], device="cpu")[
                "perplexity"
            ],
            "sparsity": zeros / total,
            **{f"mask_agreement_with_{o}": _agreement(w, pruned[o]) / total for o in others},
        }
    return out


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """Positions whose zero/non-zero state is the same in ``a`` and ``b``."""
    return sum(int(((t == 0) == (b[k] == 0)).sum()) for k, t in a.items())


def _child(argv: list[str], python: str = sys.executable) -> dict[str, Any]:
    out = subprocess.run([python, __file__, *argv], capture_output=True, text=True, cwd=WORK)
    if out.returncode:
        raise RuntimeError(f"{argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _controls(info: dict[str, Any], method: str, setting: str) -> list[str]:
    """``[PEER_COUNTS]`` where Shears' per-row Wanda counts differ from the peers' (70% of the
    4.9 M model's 688-wide ``down_proj`` rows: 482 against 481), else none."""
    from core.allocation import removal_count  # Shears' count: round(s x n), halves up

    sparsity, n_m = SETTINGS[setting]
    widths = (info["config"]["hidden_size"], info["config"]["intermediate_size"])
    differs = any(removal_count(sparsity, w) != int(sparsity * w) for w in widths)
    return [PEER_COUNTS] if method == "wanda" and n_m is None and differs else []


def quality(args: argparse.Namespace) -> None:
    info = prepare(args.train_minutes)
    print(f"model: {info}", file=sys.stderr)
    impls = ["shears", *args.peers]
    pythons = {
        "shears": sys.executable,
        PEER_COUNTS: sys.executable,
        "reference": sys.executable,
        "llmcompressor": args.llmc_python,
    }
    rows = []
    for method in args.methods:
        for setting in args.settings:
            row: dict[str, Any] = {"method": method, "setting": setting}
            here = impls + _controls(info, method, setting)
            for impl in here:
                # A finished child's result is kept, so an interrupted run resumes where it was.
                cached = WORK / f"result-{impl}-{method}-{setting.replace(':', '_')}.json"
                if cached.exists():
                    r = json.loads(cached.read_text())
                else:
                    r = _child(
                        ["_quality", impl, method, setting, str(args.repeats), args.reference],
                        pythons[impl],
                    )
                    cached.write_text(json.dumps(r))
                print(json.dumps(r), file=sys.stderr, flush=True)
                row[impl] = {**r, "time": _summary(r["seconds"]), "mem": _summary(r["extra_mib"])}
            for impl, scored in _score(here, method, setting).items():
                row[impl].update(scored)
            rows.append(row)
    result = {
        "model": info,
        "threads": 2,
        "torch": torch.__version__,
        "rows": rows,
        "peers": {
            "reference": "locuslab/wanda " + args.reference_commit,
            "llmcompressor": args.llmc_version,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"dense perplexity {info['dense_perplexity']:.3f}")
    print(
        "| method | setting | implementation | perplexity | masks = Shears' | prune time s "
        "| extra peak RSS MiB | time ÷ peer | memory ÷ peer |"
    )
    for r in rows:
        s = r["shears"]
        for impl in impls + _controls(info, r["method"], r["setting"]):
            x = r[impl]
            ratio_t = ratio_m = ""
            if impl in args.peers:
                ratio_t = f"{s['time']['median'] / x['time']['median']:.2f}"
                ratio_m = f"{s['mem']['median'] / max(x['mem']['median'], 1e-9):.2f}"
            print(
                f"| {r['method']} | {r['setting']} | {impl} | {x['perplexity']:.3f} "
                f"| {x['mask_agreement_with_shears']:.4f} | {x['time']['median']:.2f} "
                f"({x['time']['min']:.2f}–{x['time']['max']:.2f}) | {x['mem']['median']:.0f} "
                f"({x['mem']['min']:.0f}–{x['mem']['max']:.0f}) | {ratio_t} | {ratio_m} |"
            )


# -- scale -----------------------------------------------------------------------------------------


def _scale_one(a: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.allocator import set_mmap_threshold

    torch.set_num_threads(a.threads)
    # SHEARS_MALLOC_MMAP_THRESHOLD_BYTES of a worker (off by default, as here); e.g.
    # --malloc-mmap-threshold 4194304 (DEFAULT_MMAP_THRESHOLD) for a memory-bound one.
    threshold = a.malloc_mmap_threshold or 0
    set_mmap_threshold(threshold)
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
    )
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    build = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    calibration = torch.randint(
        0, a.vocab, (a.samples, a.seq), generator=torch.Generator().manual_seed(1)
    )
    sparsity, n_m = SETTINGS[a.setting]
    forward = None
    if a.impl == "shears":
        budget = None if a.memory_budget_mib is None else int(a.memory_budget_mib * 2**20)
        fn = prune_shears(model, calibration, a.method, sparsity, n_m, budget)
        forward = _samples_per_forward(model, a.seq, budget)
    elif a.impl == "reference":
        fn = prune_ref(model, calibration, a.method, sparsity, n_m, a.reference)
    else:
        # oneshot reads the config from the model's name_or_path: save it, load it back.
        path = WORK / f"scale-model-{a.layers}"
        model.save_pretrained(path)
        del model
        model = load_resident(path)
        fn = prune_llmc(model, calibration, a.method, sparsity, n_m)
    rss_model = _status_kib("VmRSS") / 1024
    r = measured(fn)
    act = a.samples * a.seq * a.hidden * 4
    zeros = sum(
        int((m.weight == 0).sum())
        for m in model.model.layers.modules()
        if isinstance(m, torch.nn.Linear)
    )
    total = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    return {
        "impl": a.impl,
        "method": a.method,
        "setting": a.setting,
        "layers": a.layers,
        "malloc_mmap_threshold": threshold,
        "parameters": params,
        "build_seconds": build,
        "rss_model_mib": rss_model,
        "layer_weights_mib": layer_bytes / 2**20,
        "activations_mib": act / 2**20,
        "samples": a.samples,
        "seq": a.seq,
        "memory_budget_mib": a.memory_budget_mib,
        "samples_per_forward": forward,
        "sparsity": zeros / total,
        **r,
        "load_average_1min": os.getloadavg()[0],
    }


def _samples_per_forward(model: Any, seq: int, budget: int | None) -> int | None:
    """How many calibration samples Shears runs per forward (None where the code predates
    ``calibration_batch``)."""
    from core.pruning.llm import sequential
    from core.pruning.llm.layers import decoder_layers

    first = decoder_layers(model)[0]
    if budget is None:
        default = getattr(sequential, "default_memory_budget", None)
        budget = default(first) if default else getattr(sequential, "CALIBRATION_MEMORY", None)
    batch = getattr(sequential, "calibration_batch", None)
    return None if batch is None or budget is None else int(batch(model, first, seq, budget))


def scale(a: argparse.Namespace) -> None:
    argv = [
        "_scale",
        "--method",
        a.method,
        "--impl",
        a.impl,
        "--layers",
        str(a.layers),
        "--setting",
        a.setting,
        "--samples",
        str(a.samples),
        "--seq",
        str(a.seq),
        "--hidden",
        str(a.hidden),
        "--intermediate",
        str(a.intermediate),
        "--heads",
        str(a.heads),
        "--kv-heads",
        str(a.kv_heads),
        "--vocab",
        str(a.vocab),
        "--reference",
        a.reference,
        *([] if a.memory_budget_mib is None else ["--memory-budget-mib", str(a.memory_budget_mib)]),
        "--threads",
        str(a.threads),
        *(
            []
            if a.malloc_mmap_threshold is None
            else ["--malloc-mmap-threshold", str(a.malloc_mmap_threshold)]
        ),
    ]
    WORK.mkdir(parents=True, exist_ok=True)
    r = _child(argv, a.llmc_python if a.impl == "llmcompressor" else sys.executable)
    # Goal: one decoder layer's weights + the calibration activations (the N x T x hidden input
    # buffer and one more of the same size for the outputs) + 20%.
    r["bound_mib"] = 1.2 * (r["layer_weights_mib"] + 2 * r["activations_mib"])
    r["extra_over_bound"] = r["extra_mib"] / r["bound_mib"]
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    data["runs"].append(
        {
            **r,
            "torch": torch.__version__,
            "threads": a.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
    out.write_text(json.dumps(data, indent=1))
    print(json.dumps(r, indent=1))


def add_widths(
    parser: argparse.ArgumentParser, widths: tuple[int, int, int, int], *, samples: int
) -> None:
    """The Llama widths (hidden, intermediate, heads, key/value heads) and the calibration
    size as options, with these defaults (also bench/llm_phases.py)."""
    hidden, intermediate, heads, kv_heads = widths
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--intermediate", type=int, default=intermediate)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv-heads", type=int, default=kv_heads)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq", type=int, default=512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--reference", default="/tmp/wanda-ref")  # noqa: S108
    q.add_argument("--reference-commit", default="8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6")
    q.add_argument("--peers", nargs="+", default=["llmcompressor", "reference"])
    q.add_argument("--llmc-python", default="/tmp/llmc-venv/bin/python")  # noqa: S108
    q.add_argument("--llmc-version", default="llmcompressor 0.14.0.1 (transformers 5.17.0)")
    q.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    q.add_argument("--settings", nargs="+", default=list(SETTINGS))
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--train-minutes", type=float, default=4.0)
    q.add_argument("--out", default=str(ROOT / "docs/data/llm_quality.json"))
    qo = sub.add_parser("_quality")
    qo.add_argument("impl")
    qo.add_argument("method")
    qo.add_argument("setting")
    qo.add_argument("repeats", type=int)
    qo.add_argument("reference")
    for name in ("scale", "_scale"):
        s = sub.add_parser(name)
        s.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
        s.add_argument("--impl", default="shears", choices=["shears", "reference", "llmcompressor"])
        s.add_argument("--llmc-python", default="/tmp/llmc-venv/bin/python")  # noqa: S108
        s.add_argument("--setting", default="50%", choices=list(SETTINGS))
        s.add_argument("--layers", type=int, default=22)
        add_widths(s, (2048, 5632, 32, 4), samples=8)
        s.add_argument("--vocab", type=int, default=32000)
        s.add_argument("--reference", default="/tmp/wanda-ref")  # noqa: S108
        # Shears' calibration memory budget; default: what prune_causal_lm chooses.
        s.add_argument("--memory-budget-mib", type=float, default=None)
        # Intra-op threads of every implementation (1: steadier beside another busy process).
        s.add_argument("--threads", type=int, default=2)
        s.add_argument(
            "--malloc-mmap-threshold",
            type=int,
            default=None,
            help="glibc mmap threshold in bytes, as SHEARS_MALLOC_MMAP_THRESHOLD_BYTES (default 0)",
        )
        s.add_argument("--out", default=str(ROOT / "docs/data/llm_scale.json"))
    a = p.parse_args()
    if a.cmd == "quality":
        quality(a)
    elif a.cmd == "_quality":
        print(json.dumps(_quality_one(a.impl, a.method, a.setting, a.repeats, a.reference)))
    elif a.cmd == "scale":
        scale(a)
    else:
        print(json.dumps(_scale_one(a)))


if __name__ == "__main__":
    main()
