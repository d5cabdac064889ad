"""Cost of a causal language model: MACs per token, prefill latency, decoding throughput.

* ``macs``: one forward over ``batch_size x T`` tokens (T = 128, at most the context length),
  counted by :func:`core.metrics.count_macs` and divided by the tokens. Attention runs on
  SDPA's math kernel while counting, so its matmuls are counted on every device (torch's flop
  counter knows the CUDA attention kernels but not the CPU one).
* ``latency_ms``: the median of that same forward (a prefill without a KV cache).
* ``tokens_per_second``: greedy decoding at batch 1 with the KV cache, ``model.generate`` with
  ``do_sample=False`` and exactly N new tokens (N = min(128, context - 8)) after an 8-token
  prompt, timed with ``time.perf_counter`` around the whole call (the prompt's prefill included;
  it is 8 tokens against N decode steps); the median rate of a few calls.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from core.device import pick_device, synchronize
from core.formats.base import MeasureConfig, Measurement
from core.formats.hf.gate import HfInfo
from core.metrics import count_macs, median_latency_ms

PREFILL_TOKENS = 128
PROMPT_TOKENS = 8
MAX_NEW_TOKENS = 128
# Each decode run is N forward passes: a few runs give a stable median without a long wait.
MAX_DECODE_REPEATS = 3


def measure(
    model: Any,
    info: HfInfo,
    config: MeasureConfig,
    eos_token_id: int | None = None,
) -> Measurement:
    """MACs per token, prefill latency and decode throughput of ``model`` on ``config.device``.

    The model is moved to the device only if it is elsewhere, and moved back afterwards; it is
    measured in eval mode under ``torch.no_grad()`` and left in the mode it was in.
    """
    device = pick_device(config.device)
    context = info.config.max_position_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = _prefill_ids(model, info, config, generator).to(device)
    vocab = _vocab(model, info)
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=generator).to(device)
    new_tokens = max(1, min(MAX_NEW_TOKENS, context - PROMPT_TOKENS) if context else MAX_NEW_TOKENS)

    with _on_device(model, device), torch.no_grad():
        macs = prefill_macs(model, ids)
        latency = _prefill_latency(model, ids, config, device)
        tokens_per_second = _decode_rate(model, prompt, new_tokens, eos_token_id, config, device)
    return Measurement(
        macs=macs,
        latency_ms=latency,
        batch_size=config.batch_size,
        device=str(device),
        tokens_per_second=tokens_per_second,
    )


def prefill_latency_ms(model: Any, info: HfInfo, config: MeasureConfig) -> float:
    """The ``latency_ms`` of :func:`measure` alone: the same tokens, device and timer, without
    counting MACs or decoding (a latency target measures candidates with it)."""
    device = pick_device(config.device)
    ids = _prefill_ids(model, info, config, torch.Generator().manual_seed(0)).to(device)
    with _on_device(model, device), torch.no_grad():
        return _prefill_latency(model, ids, config, device)


def _prefill_ids(
    model: Any, info: HfInfo, config: MeasureConfig, generator: torch.Generator
) -> torch.Tensor:
    """The measured forward's tokens: ``(batch_size, T)`` drawn first from ``generator``."""
    seq = prefill_tokens(info.config.max_position_embeddings)
    return torch.randint(0, _vocab(model, info), (config.batch_size, seq), generator=generator)


def _vocab(model: Any, info: HfInfo) -> int:
    return info.config.vocab_size or int(model.get_input_embeddings().weight.shape[0])


def _prefill_latency(
    model: Any, ids: torch.Tensor, config: MeasureConfig, device: torch.device
) -> float:
    """The one timer of ``latency_ms``: the median of ``config.repeats`` forwards over ``ids``
    without a KV cache (the model already on ``device``, in eval mode)."""
    return median_latency_ms(
        lambda: model(input_ids=ids, use_cache=False), config.warmup, config.repeats, device
    )


def prefill_tokens(context: int | None) -> int:
    """Tokens per sequence of the measured forward: ``PREFILL_TOKENS``, at most the context."""
    return min(PREFILL_TOKENS, context) if context else PREFILL_TOKENS


def prefill_macs(model: Any, ids: torch.Tensor) -> int:
    """MACs per token of one forward over ``ids`` (``(batch, T)`` on the model's device), with
    attention on SDPA's math kernel so that its matmuls are counted on every device."""
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return count_macs(lambda: model(input_ids=ids, use_cache=False), batch_size=ids.numel())


def _decode_rate(
    model: Any,
    prompt: torch.Tensor,
    new_tokens: int,
    eos_token_id: int | None,
    config: MeasureConfig,
    device: torch.device,
) -> float:
    from transformers import GenerationConfig

    # A fresh config: the checkpoint's sampling settings must not change what is timed.
    settings = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS is masked until N tokens exist: every run is N steps
        use_cache=True,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    mask = torch.ones_like(prompt)

    def decode() -> int:
        out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=settings)
        return int(out.shape[1] - prompt.shape[1])

    if config.warmup > 0:
        decode()
    rates = []
    for _ in range(max(1, min(config.repeats, MAX_DECODE_REPEATS))):
        synchronize(device)
        start = time.perf_counter()
        produced = decode()
        synchronize(device)
        rates.append(produced / (time.perf_counter() - start))
    return statistics.median(rates)


@contextlib.contextmanager
def _on_device(model: Any, device: torch.device) -> Iterator[None]:
    """``model`` on ``device`` in eval mode for the block; where and how it was, afterwards."""
    first = next(model.parameters(), None)
    origin = first.device if first is not None else device
    was_training = model.training
    moved = origin.type != device.type or (origin.index or 0) != (device.index or 0)
    if moved:
        model.to(device)
    model.eval()
    try:
        yield
    finally:
        if moved:
            model.to(origin)
        model.train(was_training)
