"""Ratios found automatically for language models (issue 14): perplexity at equal parameters of
three ways to choose per-decoder-layer sparsity -- uniform, OWL and Shears' search.

    .venv/bin/python bench/search_lm.py            # ~10 min on 2 busy cores (trains first)
    # results: docs/data/search_lm.json, docs/benchmarks.md ("Ratios found automatically")

The model: a 4-layer Llama (d 128, MLP 344, 2k BPE) trained 100 steps of 16 x 64 tokens on
the standard library's source (bench/llm.py's text split), reused from /tmp/shears-bench-search-lm
when there. The held-out text is split in two: the first half is the search text (Shears' scan
scores on it), the second the evaluation text (64 blocks of 64 tokens) every method is judged
on. Calibration: 64 training blocks the model was not trained on.

- uniform: every linear of every decoder layer at sparsity S;
- OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): each layer's outlier ratio D_l =
  share of its Wanda scores |W| * ||X|| above M x their mean (M = 5), on the dense model's
  calibration activations; keep ratios = D scaled to [0, 2 lambda] (lambda = 0.08), centred on
  1 - S (the authors' code);
- search: Shears' scan (each decoder layer alone at 0.2, 0.4, 0.6, 0.8, 0.9; perplexity on 16
  search blocks)
  and ``pruning.target: {"params": p}`` with p the uniform model's kept fraction.
All three prune with the same criterion, so the comparison is about *allocation*; perplexity
straight after pruning (no fine-tuning).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.llm import _stdlib_text, name_eos, shuffled_blocks, tar_folder, train_bpe  # noqa: E402

WORK = Path("/tmp/shears-bench-search-lm")  # noqa: S108  (scratch: model, text, blocks)
SEQ = 64

OWL_M = 5.0
OWL_LAMBDA = 0.08


def prepare(steps: int, seed: int = 0) -> dict[str, Any]:
    """bench/llm.py's data and tokenizer; a 4-layer Llama trained a fixed number of steps (not
    minutes: this machine's load varies). Reused from ``WORK`` when there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    meta = WORK / "meta.json"
    if meta.exists():
        return dict(json.loads(meta.read_text()))
    WORK.mkdir(parents=True, exist_ok=True)
    train_text, held_text = _stdlib_text()
    (WORK / "train.txt").write_text(train_text)
    (WORK / "held.txt").write_text(held_text)
    tokenizer = train_bpe(train_text, 2048)
    tokenizer.save(str(WORK / "tokenizer.json"))
    g = torch.Generator().manual_seed(seed)
    train, _ = shuffled_blocks(WORK, tokenizer, SEQ, g)
    calibration, train = train[:64], train[64:]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        initializer_range=0.05,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (16,), generator=g)
        loss = model(input_ids=train[idx], labels=train[idx], use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    model.save_pretrained(WORK / "model")
    torch.save({"calibration": calibration}, WORK / "blocks.pt")
    info = {
        "config": {
            k: getattr(config, k)
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": steps,
        "batch": [16, SEQ],
    }
    meta.write_text(json.dumps(info, indent=1))
    return info


def checkpoint() -> Path:
    """bench/llm.py's model as an uploaded checkpoint (its folder, tokenizer, in a tar)."""
    out = WORK / "llama.tar"
    if out.exists():
        return out
    folder = WORK / "model"
    (folder / "tokenizer.json").write_bytes((WORK / "tokenizer.json").read_bytes())
    name_eos(folder)
    return tar_folder(folder, out)


def texts() -> tuple[Path, Path]:
    held = (WORK / "held.txt").read_text()
    middle = len(held) // 2
    search, evaluation = WORK / "search.txt", WORK / "eval.txt"
    search.write_text(held[:middle])
    evaluation.write_text(held[middle:])
    return search, evaluation


def owl_ratios(model: Any, calibration: torch.Tensor, sparsity: float) -> dict[str, float]:
    """OWL's per-layer sparsity from the dense model's outlier ratios."""
    from core.pruning.llm.layers import decoder_layers

    layers = decoder_layers(model)
    norms: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        for linear in layer.linears:

            def hook(_m: Any, args: tuple[torch.Tensor, ...], _o: Any, name: str = linear.name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                norms[name] = norms.get(name, 0) + x.square().sum(0)

            handles.append(linear.module.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, calibration.shape[0], 8):
            model(input_ids=calibration[start : start + 8], use_cache=False)
    for h in handles:
        h.remove()
    outliers = []
    for layer in layers:
        scores = torch.cat(
            [
                (lin.matrix(torch.float32).abs() * norms[lin.name].sqrt().unsqueeze(0)).flatten()
                for lin in layer.linears
            ]
        )
        outliers.append(float((scores > OWL_M * scores.mean()).float().mean()))
    d = torch.tensor(outliers)
    span = float(d.max() - d.min())
    keep = (d - d.min()) / span * 2 * OWL_LAMBDA if span > 0 else torch.zeros_like(d)
    keep = keep - keep.mean() + (1 - sparsity)
    return {layer.name: float(1 - k) for layer, k in zip(layers, keep, strict=True)}


def perplexity_at(
    model: Any, ratios: dict[str, float], criterion: str, calibration: torch.Tensor, blocks: Any
) -> tuple[float, float]:
    """(perplexity on ``blocks``, kept fraction of the decoder linears) with each decoder
    layer's linears at its ratio."""
    from core.lm_recovery import evaluate_perplexity
    from core.pruning.llm.layers import decoder_layers
    from core.pruning.llm.sequential import prune_causal_lm

    pruned = copy.deepcopy(model)
    per_linear = {
        lin.name: ratios[layer.name] for layer in decoder_layers(pruned) for lin in layer.linears
    }
    prune_causal_lm(pruned, per_linear, criterion=criterion, input_ids=calibration)
    linears = [lin for layer in decoder_layers(pruned) for lin in layer.linears]
    kept = sum(int(lin.weight.count_nonzero()) for lin in linears) / sum(
        lin.weight.numel() for lin in linears
    )
    ppl = evaluate_perplexity(pruned, blocks, device="cpu")["perplexity"]
    return float(ppl), kept


def run(
    criteria: list[str], sparsities: list[float], steps: int, grid: list[float], out: Path
) -> None:
    from core.lm_recovery import evaluate_perplexity
    from core.search import open_scanner
    from core.search.targets import choose, curves_from_cells
    from core.spec import JobSpec
    from core.text import token_blocks

    torch.set_num_threads(2)
    meta = prepare(steps)
    archive = checkpoint()
    search, evaluation = texts()
    calibration = torch.load(WORK / "blocks.pt")["calibration"]
    results: list[dict[str, Any]] = []
    for criterion in criteria:
        spec = JobSpec.model_validate(
            {
                "pruning": {
                    "criterion": criterion,
                    "granularity": "unstructured",
                    "target": {"params": 0.5},
                    "search": {"num_samples": 16, "grid": grid},
                },
                "calibration": {"num_samples": 64, "seq_len": SEQ},
                "evaluation": {"task": "perplexity", "seq_len": SEQ},
            }
        )
        start = time.perf_counter()
        scanner = open_scanner(spec, archive, search, WORK / "train.txt", device="cpu")
        # The calibration the other methods use (bench/llm.py's held-back training blocks).
        scanner.calibration = (calibration,)  # type: ignore[attr-defined]
        baseline = scanner.score(None, 0.0)
        keys = [u.key for u in scanner.units()]
        cells = {(k, r): scanner.score(k, r) for k in keys for r in scanner.grid}
        scan_s = time.perf_counter() - start
        curves = curves_from_cells(keys, baseline, cells, "loss", higher_is_better=False)
        cost = scanner.cost_model()
        model = scanner.model.model  # type: ignore[attr-defined]
        tokenizer = scanner.model.tokenizer  # type: ignore[attr-defined]
        blocks = token_blocks(evaluation, tokenizer, SEQ, tokenizer.token_to_id("<eos>"), 64)
        dense = evaluate_perplexity(model, blocks, device="cpu")["perplexity"]
        for s in sparsities:
            uniform = dict.fromkeys(keys, s)
            budget = cost.fraction("params", uniform)
            target = spec.pruning.model_copy(update={"target": spec.pruning.target.model_copy(
                update={"params": budget})}).target  # fmt: skip
            assert target is not None
            chosen = choose(target, curves, curves, cost).ratios
            row: dict[str, Any] = {
                "criterion": criterion,
                "sparsity": s,
                "params_budget": budget,
                "dense_perplexity": dense,
                "scan_seconds": scan_s,
            }
            for name, ratios in (
                ("uniform", uniform),
                ("owl", owl_ratios(model, calibration, s)),
                ("search", chosen),
            ):
                ppl, kept = perplexity_at(model, ratios, criterion, calibration, blocks)
                row[name] = {"perplexity": ppl, "kept_linear": kept, "ratios": ratios}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": meta, "results": results}, indent=1))
    print("\n| criterion | sparsity | dense | uniform | OWL | search |")
    for r in results:
        print(
            f"| {r['criterion']} | {r['sparsity']:.0%} | {r['dense_perplexity']:.2f} | "
            f"{r['uniform']['perplexity']:.2f} | {r['owl']['perplexity']:.2f} | "
            f"{r['search']['perplexity']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", nargs="+", default=["wanda", "magnitude"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--grid", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 0.9])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/data/search_lm.json")
    a = parser.parse_args()
    run(a.criteria, a.sparsities, a.steps, a.grid, a.out)


if __name__ == "__main__":
    main()
