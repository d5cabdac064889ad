"""Validate a ``.safetensors`` header from its bytes, without reading a weight.

The file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data. The
JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative
to the data), plus an optional ``__metadata__`` of strings. The checks mirror what the
``safetensors`` loader itself insists on -- known dtypes, ``end - begin`` equal to
dtype size x shape, tensors covering the data exactly, in order, with no gap or overlap -- so a
file the gate passes is one the loader reads as described, and the parameter count is exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

from core.errors import InvalidArchive, UnsafeArchive

HEADER_LENGTH_BYTES: Final = 8

# Bytes per element of every dtype safetensors defines at byte granularity. Sub-byte types
# (F4, F6_*) are left out: v1 checkpoints do not use them and their sizes are not dtype x shape.
DTYPE_BYTES: Final[dict[str, int]] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

TORCH_DTYPE_NAMES: Final[dict[str, str]] = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str  # safetensors spelling: "F32", "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def header_length(first8: bytes, member_size: int, cap: int, where: str) -> int:
    """The JSON header length, bounded by ``cap`` and by what the member can hold."""
    if len(first8) != HEADER_LENGTH_BYTES:
        raise InvalidArchive(f"{where} is too short to be a safetensors file.")
    length = int.from_bytes(first8, "little")
    if length > cap:
        raise UnsafeArchive(
            f"{where} declares a {length}-byte safetensors header; the limit is {cap} bytes."
        )
    if length == 0 or HEADER_LENGTH_BYTES + length > member_size:
        raise InvalidArchive(f"{where} declares a safetensors header larger than the file.")
    return length


def parse_header(raw: bytes, member_size: int, where: str) -> list[TensorEntry]:
    """Tensors of one safetensors file, after checking every entry against the file's size.

    Raises:
        InvalidArchive: malformed JSON, an unknown dtype, a shape or offsets that disagree with
            the dtype or the file, gaps or overlaps between tensors.
    """
    header = load_json(raw, where)
    data_size = member_size - HEADER_LENGTH_BYTES - len(raw)
    spans: list[tuple[int, int, TensorEntry]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise InvalidArchive(f"{where}: __metadata__ must map strings to strings.")
            continue
        spans.append(_entry(name, entry, data_size, where))
    spans.sort(key=lambda span: (span[0], span[1]))
    position = 0
    for begin, end, tensor in spans:
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise InvalidArchive(f"{where}: tensor {tensor.name!a} {problem}.")
        position = end
    if position != data_size:
        raise InvalidArchive(
            f"{where}: the tensors cover {position} bytes but the file holds {data_size}."
        )
    return [tensor for _, _, tensor in spans]


def load_json(raw: bytes, where: str) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys and non-finite numbers (readers disagree on them)."""
    try:
        parsed = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArchive(f"{where} is not valid JSON ({exc}).") from exc
    if not isinstance(parsed, dict):
        raise InvalidArchive(f"{where} must hold a JSON object.")
    return parsed


def _entry(name: str, entry: object, data_size: int, where: str) -> tuple[int, int, TensorEntry]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidArchive(f"{where}: tensor {name!a} needs exactly dtype, shape, data_offsets.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise InvalidArchive(f"{where}: tensor {name!a} has an unknown dtype {dtype!a}.")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidArchive(f"{where}: tensor {name!a} has a shape that is not non-negative ints.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise InvalidArchive(f"{where}: tensor {name!a} has data offsets outside the file.")
    tensor = TensorEntry(name=name, dtype=dtype, shape=tuple(shape))
    if offsets[1] - offsets[0] != tensor.numel * DTYPE_BYTES[dtype]:
        raise InvalidArchive(
            f"{where}: tensor {name!a} spans {offsets[1] - offsets[0]} bytes but {dtype} "
            f"{list(shape)} needs {tensor.numel * DTYPE_BYTES[dtype]}."
        )
    return offsets[0], offsets[1], tensor


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!a}")
        out[key] = value
    return out


def _no_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token}")
