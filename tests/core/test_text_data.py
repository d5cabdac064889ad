"""Text and token-id datasets for language models: detection, refusal, blocks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Encoding, Tokenizer

from core.errors import DatasetMismatch, InvalidDataset, InvalidSpec, UnsupportedFormat
from core.text import (
    CALIBRATION_SEQ_LEN,
    EVAL_SEQ_LEN,
    FINE_TUNE_SEQ_LEN,
    TextLimits,
    inspect_lm_dataset,
    inspect_text_dataset,
    inspect_token_dataset,
    resolve_eos_id,
    resolve_seq_len,
    token_blocks,
)
from tests.core.text_corpus import EOS, corpus, documents, train_tokenizer


@pytest.fixture(scope="module")
def text() -> str:
    return corpus()


@pytest.fixture(scope="module")
def tokenizer(text: str) -> Tokenizer:
    return train_tokenizer(text)


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- detection ----------------------------------------------------------------------------------


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    body = '\ufefffirst line\r\nstill first\r\n\r\n  \n\nsecond\n\nthird {"text": 1}\n'
    info = inspect_text_dataset(_write(tmp_path / "a.txt", body))
    assert (info.format, info.num_samples) == ("text", 3)
    assert info.size_bytes == len(body.encode())
    assert not info.has_targets


def test_jsonl_is_detected_from_content_not_the_name(tmp_path: Path) -> None:
    rows = [{"text": "one"}, {"text": "two", "source": "x"}, {"text": ""}]
    body = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n"
    info = inspect_text_dataset(_write(tmp_path / "data.txt", body))
    assert (info.format, info.num_samples) == ("jsonl", 3)


def test_a_json_looking_line_after_the_first_keeps_a_file_text(tmp_path: Path) -> None:
    body = 'config example:\n{"text": "not a record"}\n\nmore prose\n'
    info = inspect_text_dataset(_write(tmp_path / "a.jsonl", body))
    assert (info.format, info.num_samples) == ("text", 2)


def test_stdlib_source_is_a_text_dataset(tmp_path: Path, text: str) -> None:
    info = inspect_text_dataset(_write(tmp_path / "src.txt", text))
    assert info.format == "text"
    assert info.num_samples == len(documents(text)) > 100


# --- refusals, each naming the line -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"good\nalso good\n\xff\xfe bad\n", "line 3 is not valid UTF-8"),
        (b"good\nnul \x00 here\n", "line 2 holds a NUL byte"),
        (b'{"text": "a"}\n{"text": 3}\n', "line 2: the object has no string field 'text'"),
        (b'{"text": "a"}\n\n["text"]\n', "line 3 is not a JSON object"),
        (b'{"text": "a"}\nplain prose\n', "line 2 is not a JSON object"),
        (b'\n{"content": "a"}\n', "line 2: the object has no string field 'text' (it has content)"),
        (b"", "holds no text"),
        (b"\n  \n\n", "holds no text"),
        (b'{"text": ""}\n{"text": " "}\n', "holds no text"),
    ],
)
def test_bad_text_is_refused_with_the_line(tmp_path: Path, body: bytes, message: str) -> None:
    with pytest.raises(InvalidDataset, match=message.replace("(", r"\(").replace(")", r"\)")):
        inspect_text_dataset(_write(tmp_path / "bad.txt", body))


def test_a_line_over_the_cap_is_refused_while_streaming(tmp_path: Path) -> None:
    limits = TextLimits(max_line_bytes=100, chunk_bytes=16)
    path = _write(tmp_path / "long.txt", "short\n" + "x" * 1000 + "\nshort\n")
    with pytest.raises(InvalidDataset, match="line 2 is longer than 100 bytes"):
        inspect_text_dataset(path, limits)
    # A line at the cap in small chunks is fine.
    ok = _write(tmp_path / "ok.txt", "a\n" + "y" * 100 + "\n\nb")
    assert inspect_text_dataset(ok, limits).num_samples == 2


# --- token ids ----------------------------------------------------------------------------------


def test_token_ids_npz_and_safetensors(tmp_path: Path) -> None:
    ids = np.arange(40, dtype=np.int32).reshape(4, 10)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    info = inspect_token_dataset(tmp_path / "ids.npz", vocab_size=40)
    assert (info.format, info.num_samples, info.tokens_per_sample) == ("npz", 4, 10)
    assert (info.max_token_id, info.has_attention_mask) == (39, False)

    mask = torch.ones(4, 10, dtype=torch.int64)
    mask[1, 6:] = 0  # row 1 is padded after 6 tokens
    save_file(
        {"input_ids": torch.from_numpy(ids).long(), "attention_mask": mask},
        tmp_path / "ids.safetensors",
    )
    assert inspect_lm_dataset(tmp_path / "ids.safetensors").format == "safetensors"
    blocks = token_blocks(tmp_path / "ids.safetensors", None, 8, None)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [r[:8] for i, r in enumerate(ids.tolist()) if i != 1]
    # Within the unpadded part the row is kept; max_blocks takes the first rows.
    assert token_blocks(tmp_path / "ids.safetensors", None, 6, None, max_blocks=2).tolist() == [
        list(range(0, 6)),
        list(range(10, 16)),
    ]
    with pytest.raises(DatasetMismatch, match="fewer than seq_len 11"):
        token_blocks(tmp_path / "ids.npz", None, 11, None)


class _Trap:
    """Unpickling this touches a marker file: proof that a reader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        ({"input_ids": np.zeros((2, 4), np.float32)}, InvalidDataset, "must be integers"),
        ({"input_ids": np.zeros((2, 4), bool)}, InvalidDataset, "must be integers"),
        ({"input_ids": np.zeros((8,), np.int64)}, InvalidDataset, "2 dimensions"),
        ({"input_ids": np.array([[1, -1]])}, InvalidDataset, "negative id"),
        ({"inputs": np.zeros((2, 4), np.int64)}, InvalidDataset, "unexpected array 'inputs'"),
        ({"attention_mask": np.ones((2, 4), np.int64)}, InvalidDataset, "no 'input_ids'"),
        ({"input_ids": np.array([[1, 2], [3, 500]])}, DatasetMismatch, "holds id 500"),
        (
            {"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.ones((2, 3), np.int64)},
            InvalidDataset,
            "'attention_mask' has shape",
        ),
    ],
)
def test_bad_token_ids_are_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray], error: type[Exception], message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        inspect_token_dataset(tmp_path / "bad.npz", vocab_size=100)


def test_object_token_ids_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    trap = np.empty((1, 2), dtype=object)
    trap[0, 0] = trap[0, 1] = _Trap(marker)
    np.savez(tmp_path / "pickled.npz", input_ids=trap)
    for call in (
        lambda: inspect_token_dataset(tmp_path / "pickled.npz"),
        lambda: token_blocks(tmp_path / "pickled.npz", None, 2, None),
    ):
        with pytest.raises(InvalidDataset, match="Python objects"):
            call()
    assert not marker.exists()


def test_a_binary_file_that_is_not_a_dataset_is_unsupported(tmp_path: Path) -> None:
    _write(tmp_path / "x.npz", b"PK\x03\x04 not a zip")
    with pytest.raises(InvalidDataset, match="not a valid zip"):
        inspect_token_dataset(tmp_path / "x.npz")
    with pytest.raises(UnsupportedFormat):
        inspect_token_dataset(_write(tmp_path / "t.txt", "text"))


# --- blocks -------------------------------------------------------------------------------------


def _eos(tokenizer: Tokenizer) -> int:
    eos = tokenizer.token_to_id(EOS)
    assert eos is not None
    return eos


def _stream(tokenizer: Tokenizer, docs: list[str], eos: int) -> list[int]:
    """Independent reference: each document encoded alone, EOS between documents."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            out.append(eos)
        out.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
    return out


def test_text_blocks_join_documents_with_eos(
    tmp_path: Path, text: str, tokenizer: Tokenizer
) -> None:
    eos = _eos(tokenizer)
    docs = documents(text)
    expected = _stream(tokenizer, docs, eos)
    seq_len = 64
    blocks = token_blocks(_write(tmp_path / "src.txt", text), tokenizer, seq_len, eos)
    assert blocks.shape == (len(expected) // seq_len, seq_len)
    assert blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == expected[: blocks.numel()]
    # An EOS sits exactly between the first two documents.
    first = len(tokenizer.encode(docs[0], add_special_tokens=False).ids)
    assert blocks.flatten()[first].item() == eos
    assert blocks.flatten()[first + 1 : first + 4].tolist() == expected[first + 1 : first + 4]
    # The same documents as JSON Lines make the same blocks.
    jsonl = "\n".join(json.dumps({"text": d}) for d in docs)
    assert torch.equal(
        token_blocks(_write(tmp_path / "src.jsonl", jsonl), tokenizer, 64, eos), blocks
    )
    # max_blocks: the first N blocks.
    assert torch.equal(
        token_blocks(tmp_path / "src.txt", tokenizer, 64, eos, max_blocks=5), blocks[:5]
    )


def test_long_documents_are_tokenized_in_pieces(tmp_path: Path, tokenizer: Tokenizer) -> None:
    # One 20-line document cut into pieces of about 100 characters: the same tokens as whole,
    # since every piece boundary is a newline the byte-level pre-tokenizer splits at anyway.
    doc = "\n".join(f"line number {i} of a long document" for i in range(20))
    path = _write(tmp_path / "long.txt", doc + "\n\nnext")
    eos = _eos(tokenizer)
    small = TextLimits(piece_chars=100, batch_chars=150)
    blocks = token_blocks(path, tokenizer, 4, eos, limits=small)
    assert inspect_text_dataset(path, small).num_samples == 2
    expected = _stream(tokenizer, [doc, "next"], eos)
    assert blocks.flatten().tolist() == expected[: blocks.numel()]


class _Counting:
    """A tokenizer that counts the characters it was asked to encode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.chars = 0
        self.calls = 0

    def encode_batch(
        self, input: Sequence[Any], is_pretokenized: bool = False, add_special_tokens: bool = True
    ) -> list[Encoding]:
        self.calls += 1
        self.chars += sum(len(s) for s in input)
        return self.inner.encode_batch(input, add_special_tokens=add_special_tokens)


def test_a_huge_file_is_read_only_as_far_as_max_blocks_needs(
    tmp_path: Path, text: str, tokenizer: Tokenizer
) -> None:
    path = tmp_path / "huge.txt"
    with path.open("w") as f:
        for _ in range(100):  # about 6 MB
            f.write(text + "\n\n")
    size = path.stat().st_size
    counting = _Counting(tokenizer)
    limits = TextLimits(batch_chars=64 * 1024)
    blocks = token_blocks(path, counting, 128, tokenizer.token_to_id(EOS), 10, limits=limits)
    assert blocks.shape == (10, 128)
    assert counting.calls == 1
    assert counting.chars < size / 50


def test_text_without_a_full_block_is_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(DatasetMismatch, match="fewer than one block"):
        token_blocks(_write(tmp_path / "tiny.txt", "x = 1"), tokenizer, 512, 0)
    with pytest.raises(InvalidSpec, match="needs the model's tokenizer"):
        token_blocks(tmp_path / "tiny.txt", None, 8, None)


# --- seq_len and EOS ----------------------------------------------------------------------------


def test_seq_len_defaults_are_capped_at_the_model_positions() -> None:
    assert (CALIBRATION_SEQ_LEN, FINE_TUNE_SEQ_LEN, EVAL_SEQ_LEN) == (2048, 512, 512)
    assert resolve_seq_len(None, CALIBRATION_SEQ_LEN, 1024) == 1024
    assert resolve_seq_len(None, EVAL_SEQ_LEN, 4096) == 512
    assert resolve_seq_len(None, EVAL_SEQ_LEN, None) == 512
    assert resolve_seq_len(128, EVAL_SEQ_LEN, 256) == 128
    with pytest.raises(InvalidSpec, match="max_position_embeddings"):
        resolve_seq_len(300, EVAL_SEQ_LEN, 256)


def test_eos_comes_from_the_token_else_the_config(tokenizer: Tokenizer) -> None:
    assert resolve_eos_id(tokenizer, EOS, 7) == tokenizer.token_to_id(EOS)
    assert resolve_eos_id(tokenizer, "</s>", [5, 6]) == 5
    assert resolve_eos_id(tokenizer, None, 3) == 3
    with pytest.raises(InvalidSpec, match="end-of-sequence"):
        resolve_eos_id(tokenizer, "</s>", None)
