"""Tiny Hugging Face checkpoints the tests build themselves (random weights, nothing downloaded).

Example::

    model, folder = save_checkpoint("llama", tmp_path / "llama")   # save_pretrained + tokenizer
    upload = archive_folder(folder, tmp_path / "llama.tar.gz", top="llama")

Every architecture is 2 decoder layers of width 32 with a byte-level BPE vocabulary of about
300 tokens trained here on the standard library's ``json`` source, so a build takes well under a
second. Llama uses grouped-query attention (4 heads, 2 key/value heads); Qwen3 and GPT-2 tie
their input and output embeddings; Qwen3 sets a head_dim that is not hidden / heads.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
EOS = "<|endoftext|>"
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, CONTEXT = 32, 2, 4, 2, 64, 128


@functools.cache
def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on ``json``'s source, with ``<|endoftext|>`` as its only special."""
    import json as json_module

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    source = inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)
    tokenizer.train_from_iterator(source.split("\n\n"), trainer=trainer)
    return tokenizer


def tiny_config(arch: str, vocab_size: int, eos_id: int, **overrides: int):
    """A transformers config of ``arch`` at test size (``overrides`` replaces the Llama-family
    sizes: ``hidden_size``, ``intermediate_size``, ...)."""
    import transformers

    common = {"vocab_size": vocab_size, "bos_token_id": eos_id, "eos_token_id": eos_id}
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **common
        )
    sizes = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CONTEXT,
        **overrides,
    }
    if arch == "llama":
        return transformers.LlamaConfig(**sizes, **common)
    if arch == "mistral":
        return transformers.MistralConfig(**sizes, sliding_window=None, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**sizes, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**sizes, head_dim=16, tie_word_embeddings=True, **common)
    raise ValueError(f"unknown test architecture {arch!r}")


def tiny_model(arch: str, seed: int = 0, **sizes: int):
    """A randomly initialised causal LM of ``arch``, in eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = bpe_tokenizer()
    config = tiny_config(arch, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS), **sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_checkpoint(arch: str, folder: Path, seed: int = 0, **sizes: int):
    """(model, folder): ``save_pretrained`` of a tiny model plus its tokenizer files
    (``sizes``: as for :func:`tiny_config`)."""
    model = tiny_model(arch, seed, **sizes)
    _save_with_tokenizer(model, folder)
    return model, folder


def _save_with_tokenizer(model, folder: Path) -> None:
    """``save_pretrained`` plus the tokenizer and the files that name its EOS token."""
    model.save_pretrained(folder)
    bpe_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}))


def folder_members(folder: Path) -> dict[str, bytes]:
    """The files of a checkpoint folder by name (for rewriting into crafted archives)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def archive_folder(folder: Path, out: Path, top: str | None = None) -> Path:
    """``folder``'s files as a .tar, .tar.gz or .zip (from ``out``'s suffix), at the root or
    under the one folder ``top``."""
    members = {
        (f"{top}/{name}" if top else name): data for name, data in folder_members(folder).items()
    }
    return write_archive(out, members)


def write_archive(
    out: Path,
    members: Mapping[str, bytes],
    symlinks: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
) -> Path:
    """An archive with exactly these member names (none checked: tests craft bad ones), plus
    tar symbolic or hard links ``name -> target``; the kind comes from ``out``'s suffix."""
    if out.name.endswith(".zip"):
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
            for name, target in (symlinks or {}).items():
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16  # S_IFLNK
                zf.writestr(info, target)
        return out
    mode = "w:gz" if out.name.endswith(".tar.gz") else "w"
    with tarfile.open(out, mode) as tar:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for links, kind in ((symlinks, tarfile.SYMTYPE), (hardlinks, tarfile.LNKTYPE)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tar.addfile(info)
    return out


def safetensors_bytes(
    header: Mapping[str, object], data: bytes, length: int | None = None
) -> bytes:
    """A safetensors file from a raw header (not checked) and data; ``length`` overrides the
    8-byte header length."""
    raw = json.dumps(header).encode()
    declared = len(raw) if length is None else length
    return declared.to_bytes(8, "little", signed=declared < 0) + raw + data


def trained_llama(folder: Path, text: str, *, layers: int, steps: int, seq: int = 32):
    """``save_pretrained`` (plus tokenizer files) into ``folder`` of a tiny grouped-query Llama
    with ``layers`` decoder layers, trained ``steps`` AdamW steps (batches of 16 blocks of
    ``seq`` tokens, seed 0, one thread) on ``text``, so that pruning it visibly costs
    perplexity. Returns ``folder``."""
    tokenizer = bpe_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("llama", seed=0, num_hidden_layers=layers)
        ids = torch.tensor(tokenizer.encode(text).ids)
        blocks = ids[: ids.numel() // seq * seq].view(-1, seq)
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            batch = blocks[torch.randint(0, blocks.shape[0], (16,), generator=generator)]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    _save_with_tokenizer(model, folder)
    return folder
