"""The Wanda authors' reference code (github.com/locuslab/wanda, ``lib/prune.py``) run on the same
model and calibration blocks as Shears, for bench/llm.py.

The reference is not part of this repository: fetch it somewhere outside it, e.g.

    git clone https://github.com/locuslab/wanda /tmp/wanda-ref   # bench used 8e8fc87

and pass ``--reference /tmp/wanda-ref``. Its ``prune_wanda`` / ``prune_sparsegpt`` run unchanged;
what this adapter supplies, and nothing more:

- ``lib.data`` (which imports ``datasets`` and downloads C4) is replaced by a module whose
  ``get_loaders`` returns our calibration blocks as the reference's ``[(input, target)]`` list;
- ``model.seqlen`` = the block length and ``model.hf_device_map = {}`` (the reference reads both);
- transformers >= 4.48 computes the rotary ``position_embeddings`` once in the model and passes
  them to every decoder layer; the reference calls each layer with only ``attention_mask`` and
  ``position_ids`` (NOTES fact 7), so the layer's forward is wrapped to compute them from the
  model's own ``rotary_emb`` and ``position_ids`` when absent;
- ``torch.cuda.synchronize`` (called unconditionally in SparseGPT's ``fasterprune``) is a no-op
  on this CPU-only build.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

_loaded: dict[str, Any] = {}


def load_reference(path: str | Path) -> Any:
    """Import the reference's ``lib.prune`` from a checkout at ``path``."""
    if "prune" in _loaded:
        return _loaded["prune"]
    root = Path(path).resolve()
    if not (root / "lib" / "prune.py").is_file():
        raise SystemExit(f"{root} has no lib/prune.py: fetch github.com/locuslab/wanda there")
    sys.path.insert(0, str(root))
    stub = types.ModuleType("lib.data")
    stub.get_loaders = lambda *a, **k: (_loaded["loader"], None)  # type: ignore[attr-defined]
    sys.modules["lib.data"] = stub
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    import lib.prune as prune  # type: ignore[import-not-found]

    _loaded["prune"] = prune
    return prune


def _wrap_rotary(model: torch.nn.Module) -> None:
    layer_cls = type(model.model.layers[0])
    if getattr(layer_cls, "_bench_wrapped", False):
        return
    original = layer_cls.forward
    rotary = model.model.rotary_emb

    def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = rotary(hidden_states, kwargs["position_ids"])
        return original(self, hidden_states, *args, **kwargs)

    layer_cls.forward = forward
    layer_cls._bench_wrapped = True


def prune_reference(
    model: torch.nn.Module,
    reference: str | Path,
    calibration: torch.Tensor,
    method: str,
    sparsity: float,
    n_m: tuple[int, int] | None,
) -> None:
    """Prune ``model`` in place with the reference ``prune_wanda`` or ``prune_sparsegpt``."""
    prune = load_reference(reference)
    _wrap_rotary(model)
    _loaded["loader"] = [(row.unsqueeze(0), row.unsqueeze(0)) for row in calibration]
    model.seqlen = int(calibration.shape[1])
    model.hf_device_map = {}
    args = SimpleNamespace(
        nsamples=int(calibration.shape[0]), seed=0, sparsity_ratio=sparsity, use_variant=False
    )
    n, m = n_m if n_m is not None else (0, 0)
    device = torch.device("cpu")
    if method == "wanda":
        prune.prune_wanda(args, model, None, device, prune_n=m - n if m else 0, prune_m=m)
    elif method == "sparsegpt":
        prune.prune_sparsegpt(args, model, None, device, prune_n=m - n if m else 0, prune_m=m)
    else:
        raise ValueError(method)


def prune_llmcompressor(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    method: str,
    sparsity: float,
    n_m: tuple[int, int] | None,
    tokenizer_file: str | Path | None = None,
) -> None:
    """Prune ``model`` in place with llm-compressor's ``oneshot`` and its
    ``WandaPruningModifier`` / ``SparseGPTModifier`` (sequential pipeline, the calibration blocks
    as an already-tokenized dataset, in order, no shuffling). Runs in llm-compressor's own venv."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # oneshot insists on a processor when given a dataset, even one already tokenized.
    if tokenizer_file is not None:
        processor = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    else:
        processor = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))  # noqa: S106
        )
    processor.pad_token = processor.eos_token = processor.unk_token = (
        "<unk>" if (tokenizer_file is None) else "<eos>"
    )

    n, m = n_m if n_m is not None else (0, 0)
    structure = f"{m - n}:{m}" if m else "0:0"  # llm-compressor's N:M prunes N of every M
    cls = WandaPruningModifier if method == "wanda" else SparseGPTModifier
    recipe = cls(
        sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"]
    )
    ids = calibration.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    oneshot(
        model=model,
        processor=processor,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=int(calibration.shape[0]),
        max_seq_length=int(calibration.shape[1]),
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
