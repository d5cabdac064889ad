"""Text for language-model tests: the standard library's own source, a BPE tokenizer trained on
it here, and tiny causal LMs built from transformers configs (no hub, random weights)."""

from __future__ import annotations

import inspect
import json.decoder
import json.encoder
import string
import textwrap

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<eos>"


def corpus() -> str:
    """About 60 kB of Python source; blank lines split it into a few hundred documents."""
    return "\n\n".join(inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap, string))


def documents(text: str) -> list[str]:
    """The documents of ``text`` as the plain-text format defines them (blank-line separated)."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def train_tokenizer(text: str, vocab_size: int = 512) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents(text), trainer=trainer)
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.02) -> torch.nn.Module:
    """``initializer_range`` above the default 0.02 makes the decoder layers matter from the
    start: after a short training a default-initialised model's outputs come mostly from its
    embeddings, and pruning half its linear weights barely changes them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        initializer_range=initializer_range,
    )
    model: torch.nn.Module = LlamaForCausalLM(config)
    return model.eval()


def tiny_gpt2(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
    )
    model: torch.nn.Module = GPT2LMHeadModel(config)
    return model.eval()
