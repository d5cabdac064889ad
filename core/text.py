"""Language-model datasets: UTF-8 text (``.txt``, ``.jsonl``) and token ids (``input_ids``).

Two kinds of file feed a causal language model:

* **Text**, tokenized at job time with the model's own tokenizer. Plain text holds documents
  separated by blank lines (lines that are empty or only whitespace); JSON Lines holds one object
  per line with a string field ``text`` (empty lines are skipped).
* **Token ids**: an ``.npz`` or ``.safetensors`` file holding ``input_ids`` (integers, samples x
  tokens) and optionally ``attention_mask`` (same shape, 0 or 1). The bytes are read by the same
  safe readers as every other dataset (:mod:`core.data`): ``.npy`` headers are checked before
  ``numpy.load(..., allow_pickle=False)``, so an object array is refused before any byte of it is
  decoded.

**Telling JSON Lines from text.** The format is decided by the first non-empty line, never by the
file name: if that line parses as a JSON *object*, the file is JSON Lines and every other
non-empty line must be an object with a string ``text`` too (a line that is not is refused, with
its number). Anything else is text, however JSON-looking its later lines are. A plain-text file
whose very first line is a one-line JSON object is therefore read as JSON Lines and refused at its
first line without ``text``; put any other line above it to keep it text.

**Streaming.** Files are read in chunks of :attr:`TextLimits.chunk_bytes`; only one line (at
most :attr:`TextLimits.max_line_bytes`) and one piece of a document (about
:attr:`TextLimits.piece_chars` characters, cut at a line boundary) are held at a time. A document
longer than a piece is tokenized piece by piece and the pieces' tokens concatenated (BPE merges
never cross a piece boundary, which may change a token or two there and nowhere else).

**Blocks.** :func:`token_blocks` turns either kind into ``[N, seq_len]`` token ids: text documents
are encoded without special tokens, joined with the EOS token (one EOS *between* consecutive
documents) and cut into blocks of ``seq_len`` tokens, the remainder dropped; ``input_ids`` rows are
cut to ``seq_len``, and rows shorter than ``seq_len`` (or padded within it, per
``attention_mask``) are dropped -- a file whose rows are all shorter is refused. ``max_blocks``
keeps the first N blocks and stops reading once they are filled.

Example::

    from tokenizers import Tokenizer
    from core.text import inspect_text_dataset, resolve_seq_len, token_blocks

    info = inspect_text_dataset("corpus.txt")
    print(info.format, info.num_samples)                       # text 1042
    tokenizer = Tokenizer.from_file("model/tokenizer.json")
    seq_len = resolve_seq_len(None, EVAL_SEQ_LEN, max_positions=2048)   # 512
    blocks = token_blocks("corpus.txt", tokenizer, seq_len, eos_id=2, max_blocks=64)
    print(blocks.shape, blocks.dtype)                          # torch.Size([64, 512]) torch.int64
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np
import torch

from core.data import (
    _SAFETENSORS_DTYPES,
    DatasetLimits,
    _check_dtype,
    _npy_header,
    detect_dataset_format,
)
from core.errors import DatasetMismatch, InvalidDataset, InvalidSpec, UnsupportedFormat

__all__ = [
    "CALIBRATION_SEQ_LEN",
    "EVAL_SEQ_LEN",
    "FINE_TUNE_SEQ_LEN",
    "Encoder",
    "TextDatasetInfo",
    "TextLimits",
    "TokenDatasetInfo",
    "inspect_lm_dataset",
    "inspect_text_dataset",
    "inspect_token_dataset",
    "load_token_ids",
    "resolve_eos_id",
    "resolve_seq_len",
    "token_blocks",
]

# Contract defaults for ``seq_len``; each is capped at the model's ``max_position_embeddings``.
CALIBRATION_SEQ_LEN: Final = 2048
# Calibration blocks a language-model job takes unless it says `num_samples`.
CALIBRATION_SAMPLES: Final = 128
FINE_TUNE_SEQ_LEN: Final = 512
EVAL_SEQ_LEN: Final = 512


@dataclass(frozen=True)
class TextLimits:
    """Resource limits of the text reader.

    ``max_line_bytes`` bounds the memory one line may take (a JSON Lines document is one line);
    ``chunk_bytes`` is how much is read from disk at a time; ``piece_chars`` is about how much text
    of one document is tokenized at once; ``batch_chars`` about how much text goes at most to one
    ``encode_batch`` call.
    """

    max_line_bytes: int = 16 * 1024**2
    chunk_bytes: int = 1024**2
    piece_chars: int = 1024**2
    batch_chars: int = 1024**2


@dataclass(frozen=True)
class TextDatasetInfo:
    """A valid text dataset: ``format`` ``"text"`` or ``"jsonl"``, its documents, its size."""

    format: Literal["text", "jsonl"]
    num_samples: int
    size_bytes: int

    @property
    def has_targets(self) -> bool:
        return False


@dataclass(frozen=True)
class TokenDatasetInfo:
    """A valid token-id dataset: ``format`` ``"npz"`` or ``"safetensors"``, rows x tokens."""

    format: str
    num_samples: int
    tokens_per_sample: int
    dtype: str
    has_attention_mask: bool
    max_token_id: int
    size_bytes: int

    @property
    def has_targets(self) -> bool:
        return False


class Encoder(Protocol):
    """What :func:`token_blocks` needs of a tokenizer: ``tokenizers.Tokenizer`` has it."""

    def encode_batch(
        self, input: Sequence[Any], is_pretokenized: bool = ..., add_special_tokens: bool = ...
    ) -> Sequence[_Ids]: ...


class _Ids(Protocol):
    @property
    def ids(self) -> list[int]: ...


# --------------------------------------------------------------------------------------------
# Seq len and EOS
# --------------------------------------------------------------------------------------------


def resolve_seq_len(requested: int | None, default: int, max_positions: int | None) -> int:
    """The block length a step uses: ``requested``, else ``default`` capped at the model's
    ``max_position_embeddings`` (``max_positions``; None when the model has no limit).

    Example: ``resolve_seq_len(None, CALIBRATION_SEQ_LEN, 1024) == 1024``.

    Raises:
        InvalidSpec: ``requested`` is above ``max_positions`` (the model cannot attend that far).
    """
    if requested is not None:
        if max_positions is not None and requested > max_positions:
            raise InvalidSpec(
                f"seq_len {requested} is longer than the model's max_position_embeddings "
                f"({max_positions}); use at most {max_positions}"
            )
        return requested
    return default if max_positions is None else max(1, min(default, max_positions))


def resolve_eos_id(
    tokenizer: object,
    eos_token: str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> int:
    """The id documents are joined with: ``eos_token`` (from ``tokenizer_config.json`` or
    ``special_tokens_map.json``) looked up in ``tokenizer``, else ``eos_token_id`` (generation
    config or config; the first of a list).

    Raises:
        InvalidSpec: neither names a token.
    """
    if eos_token is not None:
        token_to_id = getattr(tokenizer, "token_to_id", None)
        found = token_to_id(eos_token) if token_to_id is not None else None
        if isinstance(found, int):
            return found
    if isinstance(eos_token_id, int):
        return eos_token_id
    if isinstance(eos_token_id, Sequence) and eos_token_id and isinstance(eos_token_id[0], int):
        return int(eos_token_id[0])
    raise InvalidSpec(
        "the model names no end-of-sequence token (eos_token in its tokenizer files or "
        "eos_token_id in its config), so text documents cannot be joined; upload token ids instead"
    )


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

_BOM: Final = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class _Piece:
    """Text of one document, or a piece of it; ``first`` marks a document's first piece."""

    text: str
    first: bool


def _lines(path: Path, limits: TextLimits) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line without its end) over the file, read in chunks."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise InvalidDataset(f"the dataset file could not be read: {exc.strerror}") from exc
    with f:
        buffer = bytearray()
        number = 0
        while True:
            chunk = f.read(limits.chunk_bytes)
            if not chunk:
                break
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) != -1:
                number += 1
                yield number, _decode(number, bytes(buffer[start:end]), limits)
                start = end + 1
            del buffer[:start]
            if len(buffer) > limits.max_line_bytes:
                raise InvalidDataset(
                    f"line {number + 1} is longer than {limits.max_line_bytes} bytes; split "
                    "long documents over several lines (text) or records (JSON Lines)"
                )
        if buffer:
            number += 1
            yield number, _decode(number, bytes(buffer), limits)


def _decode(number: int, line: bytes, limits: TextLimits) -> str:
    if len(line) > limits.max_line_bytes:
        raise InvalidDataset(f"line {number} is longer than {limits.max_line_bytes} bytes")
    if number == 1 and line.startswith(_BOM):
        line = line[len(_BOM) :]
    if b"\x00" in line:
        column = line.index(b"\x00") + 1
        raise InvalidDataset(f"line {number} holds a NUL byte at column {column}: not a text file")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDataset(
            f"line {number} is not valid UTF-8 (byte {exc.start + 1} of the line); text "
            "datasets must be UTF-8"
        ) from exc
    return text.removesuffix("\r")


def _json_object(line: str) -> dict[str, object] | None:
    stripped = line.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _pieces(path: Path, limits: TextLimits, formats: list[str] | None = None) -> Iterator[_Piece]:
    """The documents of a text file as pieces, validating every line on the way; the detected
    format is appended to ``formats`` once known."""
    lines = _lines(path, limits)
    fmt: str | None = None
    pending: list[str] = []
    pending_chars = 0
    first = True
    for number, line in lines:
        if fmt is None:
            if not line.strip():
                continue
            fmt = "jsonl" if _json_object(line) is not None else "text"
            if formats is not None:
                formats.append(fmt)
        if fmt == "jsonl":
            if not line.strip():
                continue
            record = _json_object(line)
            if record is None:
                raise InvalidDataset(
                    f"line {number} is not a JSON object; in JSON Lines every non-empty line is "
                    'one object such as {"text": "..."}'
                )
            text = record.get("text")
            if not isinstance(text, str):
                raise InvalidDataset(
                    f"line {number}: the object has no string field 'text'"
                    + (f" (it has {', '.join(sorted(record)[:5])})" if record else "")
                )
            yield _Piece(text, True)
            continue
        if not line.strip():
            if pending:
                yield _Piece("\n".join(pending), first)
            pending, pending_chars, first = [], 0, True
            continue
        if pending_chars >= limits.piece_chars:
            # A long document goes out in pieces. Only now that another line follows does the
            # piece end with the newline between them (a document ends without one).
            yield _Piece("\n".join(pending) + "\n", first)
            pending, pending_chars, first = [], 0, False
        pending.append(line)
        pending_chars += len(line) + 1
    if pending:
        yield _Piece("\n".join(pending), first)


def inspect_text_dataset(
    path: str | os.PathLike[str], limits: TextLimits | None = None
) -> TextDatasetInfo:
    """Validate a text dataset (``.txt`` or ``.jsonl``, told apart by content) and count its
    documents. Streams the file; holds one line at a time.

    Example::

        Path("a.txt").write_text("first document\\n\\nsecond\\ndocument\\n")
        inspect_text_dataset("a.txt")   # TextDatasetInfo(format='text', num_samples=2, ...)

    Raises:
        InvalidDataset: invalid UTF-8, a NUL byte, a line over ``limits.max_line_bytes``, a JSON
            Lines line that is not an object with a string ``text`` (each naming the line), or no
            text at all.
    """
    path = Path(path)
    limits = limits or TextLimits()
    formats: list[str] = []
    documents = 0
    chars = 0
    for piece in _pieces(path, limits, formats):
        documents += piece.first
        chars += len(piece.text.strip())
    if documents == 0 or chars == 0:
        raise InvalidDataset("the dataset holds no text (an empty file, or only empty documents)")
    fmt: Literal["text", "jsonl"] = "jsonl" if formats[0] == "jsonl" else "text"
    return TextDatasetInfo(format=fmt, num_samples=documents, size_bytes=path.stat().st_size)


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------

_TOKEN_ARRAYS: Final = ("input_ids", "attention_mask")
_IDS_HINT: Final = (
    "Save token ids with numpy.savez(path, input_ids=ids) (integers, samples x tokens; an "
    "optional attention_mask of the same shape)."
)


def _read_token_arrays(path: Path, limits: DatasetLimits) -> tuple[str, dict[str, np.ndarray]]:
    """``input_ids`` (and ``attention_mask``) of an ``.npz``/``.safetensors`` file, with the
    format; checked from headers before any array is read (no pickle, integer dtype, size)."""
    with path.open("rb") as f:
        fmt = detect_dataset_format(f.read(16))
    if fmt == "npz":
        return fmt, _npz_token_arrays(path, limits)
    if fmt == "safetensors":
        return fmt, _safetensors_token_arrays(path, limits)
    raise UnsupportedFormat(f"not a .npz or .safetensors file. {_IDS_HINT}")


def _check_names(names: list[str]) -> None:
    unexpected = [n for n in names if n not in _TOKEN_ARRAYS]
    if unexpected:
        raise InvalidDataset(
            f"unexpected array {unexpected[0]!r} beside 'input_ids': a token-id dataset holds "
            "'input_ids' and optionally 'attention_mask'"
        )
    if "input_ids" not in names:
        raise InvalidDataset(f"the dataset has no 'input_ids' array. {_IDS_HINT}")


def _check_integer(name: str, kind: str, dtype: str) -> None:
    if kind not in "iu" or dtype == "bool":
        raise InvalidDataset(
            f"{name!r} has dtype {dtype}; token ids must be integers (int32 or int64, say)"
        )


def _npz_token_arrays(path: Path, limits: DatasetLimits) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if any(not m.filename.endswith(".npy") for m in members):
                raise InvalidDataset(f"the .npz holds a member that is not an array. {_IDS_HINT}")
            names = [m.filename.removesuffix(".npy") for m in members]
            _check_names(names)
            total = 0
            for member, name in zip(members, names, strict=True):
                with zf.open(member) as f:
                    shape, dtype = _npy_header(f, name)
                _check_dtype(name, dtype)  # refuses object arrays before any byte is decoded
                _check_integer(name, dtype.kind, str(dtype))
                expected = math.prod(shape) * dtype.itemsize
                if member.file_size < expected or member.file_size > expected + 64 * 1024:
                    raise InvalidDataset(
                        f"array {name!r}: its data does not match the shape {list(shape)} and "
                        f"dtype {dtype} its header declares"
                    )
                total += member.file_size
            if total > limits.max_total_bytes:
                raise InvalidDataset(
                    f"the arrays take {total} bytes uncompressed; at most "
                    f"{limits.max_total_bytes} are allowed"
                )
        arrays: dict[str, np.ndarray] = {}
        with np.load(path, allow_pickle=False) as npz:
            for name in names:
                arrays[name] = np.asarray(npz[name])
        return arrays
    except zipfile.BadZipFile as exc:
        raise InvalidDataset(f"the .npz file is not a valid zip archive: {exc}") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidDataset(f"the .npz file could not be read: {exc}") from exc


def _safetensors_token_arrays(path: Path, limits: DatasetLimits) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            _check_names(names)
            total = 0
            for name in names:
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                numpy_dtype = _SAFETENSORS_DTYPES.get(dtype)
                if numpy_dtype is None:
                    raise InvalidDataset(f"tensor {name!r} has dtype {dtype}, which is not numeric")
                kind = "f" if "float" in numpy_dtype else np.dtype(numpy_dtype).kind
                _check_integer(name, kind, numpy_dtype)
                total += math.prod(sl.get_shape()) * np.dtype(numpy_dtype).itemsize
            if total > limits.max_total_bytes:
                raise InvalidDataset(
                    f"the tensors take {total} bytes; at most {limits.max_total_bytes} are allowed"
                )
            return {name: f.get_tensor(name).numpy() for name in names}
    except InvalidDataset:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise InvalidDataset(f"the .safetensors file is malformed: {exc}") from exc


def _validate_ids(arrays: dict[str, np.ndarray], vocab_size: int | None) -> int:
    """Shape and value checks shared by inspection and loading; returns the largest id."""
    ids = arrays["input_ids"]
    if ids.ndim != 2:
        raise InvalidDataset(
            f"'input_ids' has shape {list(ids.shape)}; it must be samples x tokens (2 dimensions)"
        )
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InvalidDataset(f"'input_ids' of shape {list(ids.shape)} holds no tokens")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        row = int(np.argwhere(ids < 0)[0][0])
        raise InvalidDataset(f"'input_ids' holds a negative id ({low}) in row {row}")
    if vocab_size is not None and high >= vocab_size:
        row = int(np.argwhere(ids >= vocab_size)[0][0])
        raise DatasetMismatch(
            f"'input_ids' holds id {high} (row {row}) but the model's vocabulary has "
            f"{vocab_size} tokens (ids 0..{vocab_size - 1})"
        )
    mask = arrays.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            raise InvalidDataset(
                f"'attention_mask' has shape {list(mask.shape)}; 'input_ids' has {list(ids.shape)}"
            )
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
            raise InvalidDataset("'attention_mask' must hold only 0 and 1")
    return high


def inspect_token_dataset(
    path: str | os.PathLike[str],
    vocab_size: int | None = None,
    limits: DatasetLimits | None = None,
) -> TokenDatasetInfo:
    """Validate a token-id dataset: ``input_ids`` integer, samples x tokens, non-negative (and
    below ``vocab_size`` when given); ``attention_mask``, if present, the same shape, 0/1.

    Raises:
        UnsupportedFormat: neither ``.npz`` nor ``.safetensors``.
        InvalidDataset: malformed, not integers, wrong rank, negative ids, unexpected arrays.
        DatasetMismatch: an id at or above ``vocab_size``.
    """
    path = Path(path)
    fmt, arrays = _read_token_arrays(path, limits or DatasetLimits())
    high = _validate_ids(arrays, vocab_size)
    ids = arrays["input_ids"]
    return TokenDatasetInfo(
        format=fmt,
        num_samples=int(ids.shape[0]),
        tokens_per_sample=int(ids.shape[1]),
        dtype=str(ids.dtype),
        has_attention_mask="attention_mask" in arrays,
        max_token_id=high,
        size_bytes=path.stat().st_size,
    )


def load_token_ids(
    path: str | os.PathLike[str],
    seq_len: int,
    vocab_size: int | None = None,
    max_blocks: int | None = None,
    limits: DatasetLimits | None = None,
) -> torch.Tensor:
    """``input_ids`` rows cut to ``seq_len`` as ``[N, seq_len]`` int64, the first ``max_blocks``.

    Rows padded within their first ``seq_len`` tokens (a 0 in ``attention_mask`` there) are
    dropped.

    Raises:
        DatasetMismatch: the rows are shorter than ``seq_len``, none is left after dropping padded
            ones, or an id is at or above ``vocab_size``.
        UnsupportedFormat, InvalidDataset: as :func:`inspect_token_dataset`.
    """
    _, arrays = _read_token_arrays(Path(path), limits or DatasetLimits())
    _validate_ids(arrays, vocab_size)
    ids = arrays["input_ids"]
    if ids.shape[1] < seq_len:
        raise DatasetMismatch(
            f"the dataset's rows hold {ids.shape[1]} tokens, fewer than seq_len {seq_len}; set "
            f"seq_len to at most {ids.shape[1]} or upload longer rows"
        )
    ids = ids[:, :seq_len]
    mask = arrays.get("attention_mask")
    if mask is not None:
        full = mask[:, :seq_len].all(axis=1)
        ids = ids[full]
        if ids.shape[0] == 0:
            raise DatasetMismatch(
                f"every row is padded within its first {seq_len} tokens (attention_mask); none "
                "is a full block"
            )
    if max_blocks is not None:
        ids = ids[:max_blocks]
    return torch.from_numpy(np.ascontiguousarray(ids.astype(np.int64, copy=False)))


# --------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------


def inspect_lm_dataset(
    path: str | os.PathLike[str], vocab_size: int | None = None
) -> TextDatasetInfo | TokenDatasetInfo:
    """Token ids for an ``.npz``/``.safetensors`` file, text for anything else (from content)."""
    with Path(path).open("rb") as f:
        binary = detect_dataset_format(f.read(16)) is not None
    if binary:
        return inspect_token_dataset(path, vocab_size)
    return inspect_text_dataset(path)


def _text_tokens(
    path: Path, tokenizer: Encoder, eos_id: int, limits: TextLimits
) -> Generator[list[int], None, None]:
    """Token ids of the text file, documents joined with ``eos_id``, in runs of any length.

    Pieces go to ``encode_batch`` in batches that start at 64 kB of text and double up to
    ``batch_chars``: a caller that needs only a few blocks stops after a small first batch, and
    a whole-file pass still gets large batches for the tokenizer's threads.
    """
    batch: list[_Piece] = []
    chars = 0
    budget = min(64 * 1024, limits.batch_chars)
    started = False

    def flush() -> list[int]:
        nonlocal started
        encoded = tokenizer.encode_batch([p.text for p in batch], add_special_tokens=False)
        out: list[int] = []
        for piece, encoding in zip(batch, encoded, strict=True):
            if piece.first and started:
                out.append(eos_id)
            started = True
            out.extend(encoding.ids)
        return out

    for piece in _pieces(path, limits):
        batch.append(piece)
        chars += len(piece.text)
        if chars >= budget:
            yield flush()
            batch, chars = [], 0
            budget = min(2 * budget, limits.batch_chars)
    if batch:
        yield flush()


def token_blocks(
    path: str | os.PathLike[str],
    tokenizer: Encoder | None,
    seq_len: int,
    eos_id: int | None,
    max_blocks: int | None = None,
    *,
    vocab_size: int | None = None,
    limits: TextLimits | None = None,
) -> torch.Tensor:
    """The dataset at ``path`` as blocks of ``seq_len`` token ids, ``[N, seq_len]`` int64.

    Text (``.txt``/``.jsonl``) is encoded with ``tokenizer`` without special tokens, documents
    joined with ``eos_id``, and cut into ``floor(total / seq_len)`` blocks; token ids
    (``.npz``/``.safetensors``) go through :func:`load_token_ids`. With ``max_blocks`` only the
    first N blocks are made, and a text file is read only until they are filled.

    Example::

        blocks = token_blocks("wiki.txt", Tokenizer.from_file("tokenizer.json"), 512, eos_id=2)

    Raises:
        InvalidDataset: as :func:`inspect_text_dataset` / :func:`inspect_token_dataset`.
        DatasetMismatch: the data makes no full block of ``seq_len`` tokens, or (token ids) an id
            is at or above ``vocab_size``.
        InvalidSpec: text without a tokenizer or an EOS id.
    """
    if seq_len < 1:
        raise InvalidSpec(f"seq_len must be positive, not {seq_len}")
    if max_blocks is not None and max_blocks < 1:
        raise InvalidSpec(f"max_blocks must be positive, not {max_blocks}")
    path = Path(path)
    try:
        with path.open("rb") as f:
            binary = detect_dataset_format(f.read(16)) is not None
    except OSError as exc:
        raise InvalidDataset(f"the dataset file could not be read: {exc.strerror}") from exc
    if binary:
        return load_token_ids(path, seq_len, vocab_size, max_blocks)
    if tokenizer is None or eos_id is None:
        raise InvalidSpec(
            "a text dataset needs the model's tokenizer and EOS token; this model has none, so "
            "upload token ids (input_ids) instead"
        )
    limits = limits or TextLimits()
    wanted = None if max_blocks is None else max_blocks * seq_len
    blocks: list[torch.Tensor] = []
    carry: list[int] = []
    filled = 0
    # closing(): stopping early closes the file at once, not whenever the generator is collected.
    with contextlib.closing(_text_tokens(path, tokenizer, eos_id, limits)) as runs:
        for run in runs:
            carry.extend(run)
            usable = (len(carry) // seq_len) * seq_len
            if wanted is not None:
                usable = min(usable, wanted - filled)
            if usable:
                blocks.append(torch.tensor(carry[:usable], dtype=torch.int64).view(-1, seq_len))
                del carry[:usable]
                filled += usable
            if wanted is not None and filled >= wanted:
                break  # stop reading: the blocks asked for are full
    if not blocks:
        raise DatasetMismatch(
            f"the text makes {len(carry)} tokens, fewer than one block of seq_len {seq_len}"
        )
    return torch.cat(blocks)
