"""Datasets for fine-tuning, evaluation and calibration: ``.npz`` and ``.safetensors`` files.

A dataset holds ``inputs`` (or ``inputs.0``, ``inputs.1``, ... for a model with several positional
inputs) and optionally ``targets``; the first axis of every array is the sample axis.

Nothing here ever unpickles: ``.npz`` members are checked from their ``.npy`` headers before
``np.load(..., allow_pickle=False)`` reads them (an object array is refused before any byte of it
is decoded), and ``.safetensors`` is a plain header + raw bytes format by design.

Example::

    import numpy as np
    from core.data import inspect_dataset, load_dataset

    np.savez("digits.npz", inputs=np.zeros((10, 1, 8, 8), np.float32), targets=np.arange(10))
    info = inspect_dataset("digits.npz")
    print(info.format, info.num_samples, info.has_targets)   # npz 10 True
    data = load_dataset("digits.npz")
    print(data.inputs[0].shape, data.targets.dtype)          # (10, 1, 8, 8) torch.int64
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch

from core.errors import DatasetMismatch, InvalidDataset, UnsupportedFormat
from core.formats import ProgramInput

__all__ = [
    "ArrayInfo",
    "BatchRange",
    "Dataset",
    "DatasetInfo",
    "DatasetLimits",
    "batch_range",
    "inspect_dataset",
    "load_dataset",
    "match_program",
]


@dataclass(frozen=True)
class ArrayInfo:
    """One array of a dataset: its name in the file, full shape and dtype (numpy spelling)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`inspect_dataset` learnt about a valid dataset file."""

    format: str
    num_samples: int
    inputs: tuple[ArrayInfo, ...]
    targets: ArrayInfo | None

    @property
    def has_targets(self) -> bool:
        return self.targets is not None


@dataclass(frozen=True)
class Dataset:
    """The tensors of a dataset, on the CPU; ``inputs`` in positional order."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor | None

    @property
    def num_samples(self) -> int:
        return int(self.inputs[0].shape[0])


@dataclass(frozen=True)
class DatasetLimits:
    """Resource limits of the reader: decompressed bytes over all arrays, and arrays per file."""

    max_total_bytes: int = 32 * 1024**3
    max_arrays: int = 64


_NPY_MAGIC: Final = b"\x93NUMPY"
_ZIP_MAGICS: Final = (b"PK\x03\x04", b"PK\x05\x06")
_NAME: Final = re.compile(r"^(?:inputs|inputs\.(0|[1-9][0-9]{0,2})|targets)$")
# Kinds numpy calls numeric: bool, signed/unsigned integers, floats. Complex, strings, objects
# and structured records cannot feed a network (and objects would need unpickling).
_NUMERIC_KINDS: Final = frozenset("biuf")
_SAFETENSORS_DTYPES: Final = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}
_HINT: Final = (
    "Save the arrays with numpy.savez(path, inputs=..., targets=...) or "
    "safetensors.torch.save_file({'inputs': ..., 'targets': ...}, path)."
)


def detect_dataset_format(head: bytes) -> str | None:
    """``"npz"``, ``"safetensors"`` or None, from the first bytes of a file (never its name)."""
    if head.startswith(_ZIP_MAGICS):
        return "npz"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100 * 1024**2 and head[8:9] == b"{":
            return "safetensors"
    return None


def inspect_dataset(
    path: str | os.PathLike[str], limits: DatasetLimits | None = None
) -> DatasetInfo:
    """Validate the dataset at ``path`` and describe it.

    Checks: the format (from the content), the array names, numeric dtypes, one common first axis
    of at least one sample, and that every floating value is finite. Reads each array once, one
    at a time; never unpickles.

    Raises:
        UnsupportedFormat: neither ``.npz`` nor ``.safetensors``.
        InvalidDataset: the file is one of those but malformed or not a usable dataset.
    """
    fmt, arrays = _open(Path(path), limits or DatasetLimits())
    infos: dict[str, ArrayInfo] = {}
    for name, load in arrays:
        array = load()
        _check_values(name, array)
        infos[name] = ArrayInfo(name, tuple(int(d) for d in array.shape), _dtype_name(array))
        del array
    return _describe(fmt, infos)


def load_dataset(path: str | os.PathLike[str], limits: DatasetLimits | None = None) -> Dataset:
    """Validate and read the dataset at ``path`` into CPU tensors.

    Raises:
        UnsupportedFormat, InvalidDataset: as :func:`inspect_dataset`.
    """
    fmt, arrays = _open(Path(path), limits or DatasetLimits())
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, ArrayInfo] = {}
    for name, load in arrays:
        array = load()
        _check_values(name, array)
        infos[name] = ArrayInfo(name, tuple(int(d) for d in array.shape), _dtype_name(array))
        tensors[name] = array if isinstance(array, torch.Tensor) else _to_tensor(array)
    info = _describe(fmt, infos)
    return Dataset(
        inputs=tuple(tensors[i.name] for i in info.inputs),
        targets=tensors[info.targets.name] if info.targets else None,
    )


# --------------------------------------------------------------------------------------------


# (name, read): each array is read when ``read`` is called, so validation holds one at a time.
_Loader = tuple[str, Callable[[], "np.ndarray | torch.Tensor"]]


def _open(path: Path, limits: DatasetLimits) -> tuple[str, list[_Loader]]:
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise InvalidDataset(f"the dataset file could not be read: {exc.strerror}") from exc
    fmt = detect_dataset_format(head)
    if fmt == "npz":
        return fmt, _npz_arrays(path, limits)
    if fmt == "safetensors":
        return fmt, _safetensors_arrays(path, limits)
    raise UnsupportedFormat(f"not a .npz or .safetensors dataset. {_HINT}")


def _npz_arrays(path: Path, limits: DatasetLimits) -> list[_Loader]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) > limits.max_arrays:
                raise InvalidDataset(
                    f"the .npz holds {len(members)} arrays; at most {limits.max_arrays} are allowed"
                )
            total = 0
            names = []
            for member in members:
                name = member.filename.removesuffix(".npy")
                if not member.filename.endswith(".npy") or not _NAME.match(name):
                    raise InvalidDataset(
                        f"unexpected array {member.filename!r} in the .npz: expected 'inputs' "
                        "(or 'inputs.0', 'inputs.1', ...) and optionally 'targets'"
                    )
                with zf.open(member) as f:
                    shape, dtype = _npy_header(f, name)
                _check_dtype(name, dtype)
                expected = math.prod(shape) * dtype.itemsize
                # The header declares the size; a member that inflates to more is a zip bomb or
                # a corrupt file, and one that inflates to less is truncated.
                if member.file_size < expected or member.file_size > expected + 64 * 1024:
                    raise InvalidDataset(
                        f"array {name!r}: its data does not match the shape {list(shape)} and "
                        f"dtype {dtype} its header declares"
                    )
                total += member.file_size
                names.append(name)
            if total > limits.max_total_bytes:
                raise InvalidDataset(
                    f"the arrays take {total} bytes uncompressed; at most "
                    f"{limits.max_total_bytes} are allowed"
                )
    except zipfile.BadZipFile as exc:
        raise InvalidDataset(f"the .npz file is not a valid zip archive: {exc}") from exc

    def loader(name: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                with np.load(path, allow_pickle=False) as npz:
                    return np.asarray(npz[name])
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise InvalidDataset(f"array {name!r} could not be read: {exc}") from exc

        return read

    return [(name, loader(name)) for name in names]


def _npy_header(f: object, name: str) -> tuple[tuple[int, ...], np.dtype[np.generic]]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)  # type: ignore[arg-type]
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(f)  # type: ignore[arg-type]
        elif version in ((2, 0), (3, 0)):
            shape, _fortran, dtype = fmt.read_array_header_2_0(f)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise InvalidDataset(f"array {name!r} is not a valid .npy member: {exc}") from exc
    return tuple(int(d) for d in shape), dtype


def _safetensors_arrays(path: Path, limits: DatasetLimits) -> list[_Loader]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            total = 0
            for name in names:
                if not _NAME.match(name):
                    raise InvalidDataset(
                        f"unexpected tensor {name!r} in the .safetensors file: expected 'inputs' "
                        "(or 'inputs.0', 'inputs.1', ...) and optionally 'targets'"
                    )
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise InvalidDataset(f"tensor {name!r} has dtype {dtype}, which is not numeric")
                shape = sl.get_shape()
                total += (
                    math.prod(shape)
                    * torch.empty(
                        0, dtype=getattr(torch, _SAFETENSORS_DTYPES[dtype])
                    ).element_size()
                )
    except InvalidDataset:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise InvalidDataset(f"the .safetensors file is malformed: {exc}") from exc
    if len(names) > limits.max_arrays:
        raise InvalidDataset(f"the file holds {len(names)} tensors; at most {limits.max_arrays}")
    if total > limits.max_total_bytes:
        raise InvalidDataset(
            f"the tensors take {total} bytes; at most {limits.max_total_bytes} are allowed"
        )

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            try:
                with safe_open(str(path), framework="pt") as f:
                    tensor: torch.Tensor = f.get_tensor(name)
                    return tensor
            except Exception as exc:
                raise InvalidDataset(f"tensor {name!r} could not be read: {exc}") from exc

        return read

    return [(name, loader(name)) for name in names]


def _check_dtype(name: str, dtype: np.dtype[np.generic]) -> None:
    if dtype.hasobject:
        raise InvalidDataset(
            f"array {name!r} holds Python objects (dtype object); only numeric arrays are "
            "accepted, and objects would need unpickling"
        )
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidDataset(f"array {name!r} has dtype {dtype}, which is not numeric")


def _dtype_name(array: np.ndarray | torch.Tensor) -> str:
    if isinstance(array, torch.Tensor):
        return str(array.dtype).removeprefix("torch.")
    return str(array.dtype)


def _check_values(name: str, array: np.ndarray | torch.Tensor) -> None:
    if isinstance(array, np.ndarray):
        _check_dtype(name, array.dtype)
    if array.ndim == 0:
        raise InvalidDataset(f"array {name!r} is a scalar; its first axis must be the samples")
    floating = (
        array.dtype.is_floating_point
        if isinstance(array, torch.Tensor)
        else array.dtype.kind == "f"
    )
    if floating:
        finite = (
            bool(torch.isfinite(array).all())
            if isinstance(array, torch.Tensor)
            else bool(np.isfinite(array).all())
        )
        if not finite:
            raise InvalidDataset(f"array {name!r} holds NaN or infinite values")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    # torch has no unsigned 16/32/64-bit arithmetic worth training on; widen them to int64.
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(array))


def _input_names(names: set[str]) -> list[str]:
    if "inputs" in names:
        if any(n.startswith("inputs.") for n in names):
            raise InvalidDataset("use either 'inputs' or 'inputs.0', 'inputs.1', ..., not both")
        return ["inputs"]
    numbered = sorted(int(n.split(".")[1]) for n in names if n.startswith("inputs."))
    if not numbered:
        raise InvalidDataset(f"the dataset has no 'inputs' array. {_HINT}")
    if numbered != list(range(len(numbered))):
        raise InvalidDataset(
            "numbered inputs must be 'inputs.0', 'inputs.1', ... without gaps; found "
            + ", ".join(f"inputs.{i}" for i in numbered)
        )
    return [f"inputs.{i}" for i in numbered]


def _describe(fmt: str, infos: dict[str, ArrayInfo]) -> DatasetInfo:
    inputs = tuple(infos[n] for n in _input_names(set(infos)))
    targets = infos.get("targets")
    every = [*inputs, *([targets] if targets else [])]
    sizes = {a.name: a.shape[0] for a in every}
    if len(set(sizes.values())) != 1:
        listed = ", ".join(f"{n}: {s}" for n, s in sizes.items())
        raise InvalidDataset(
            f"every array must have the same number of samples (first axis); found {listed}"
        )
    num_samples = next(iter(sizes.values()))
    if num_samples < 1:
        raise InvalidDataset("the dataset holds no samples")
    return DatasetInfo(format=fmt, num_samples=num_samples, inputs=inputs, targets=targets)


# --------------------------------------------------------------------------------------------
# Feeding a program
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes a program accepts: its dynamic first dimension's range, or one size."""

    min: int
    max: int

    def clamp(self, wanted: int) -> int:
        return max(self.min, min(wanted, self.max))


def batch_range(inputs: tuple[ProgramInput, ...]) -> BatchRange:
    """From the program's first input: ``[min, max]`` of a dynamic batch, else its fixed size."""
    if not inputs or not inputs[0].shape:
        return BatchRange(1, 1)
    dim0 = next((d for d in inputs[0].dynamic_dims if d.dim == 0), None)
    if dim0 is None:
        return BatchRange(inputs[0].shape[0], inputs[0].shape[0])
    return BatchRange(max(dim0.min, 1), dim0.max if dim0.max is not None else 2**31 - 1)


def _spell(shape: tuple[int, ...] | list[int], dynamic: set[int]) -> str:
    return "[" + ", ".join("*" if i in dynamic else str(d) for i, d in enumerate(shape)) + "]"


def match_program(dataset: Dataset, inputs: tuple[ProgramInput, ...]) -> Dataset:
    """``dataset`` with its inputs cast to the program's dtypes, after checking they fit.

    Floating program inputs accept floating or integer data (cast); integer and boolean ones
    accept only integer or boolean data. Every non-batch dimension must match, except dynamic ones.

    Raises:
        DatasetMismatch: the number of inputs, a shape or a dtype does not fit; the message names
            what the model expects and what the dataset gives.
    """
    if len(dataset.inputs) != len(inputs):
        raise DatasetMismatch(
            f"the model takes {len(inputs)} input(s) ({', '.join(i.name for i in inputs)}) but "
            f"the dataset has {len(dataset.inputs)}; name them inputs.0, inputs.1, ..."
        )
    cast = []
    for position, (tensor, spec) in enumerate(zip(dataset.inputs, inputs, strict=True)):
        dynamic = {d.dim for d in spec.dynamic_dims} | {0}
        given = tuple(int(d) for d in tensor.shape)
        label = "inputs" if len(inputs) == 1 else f"inputs.{position}"
        fits = len(given) == len(spec.shape) and all(
            g == e
            for i, (g, e) in enumerate(zip(given, spec.shape, strict=True))
            if i not in dynamic
        )
        if not fits:
            raise DatasetMismatch(
                f"model input {spec.name!r} expects shape {_spell(spec.shape, dynamic)} "
                f"({spec.dtype}); the dataset's {label!r} has shape "
                f"{_spell(list(given), {0})} ({_dtype_name(tensor)}), * = any size"
            )
        want = getattr(torch, spec.dtype)
        if not want.is_floating_point and tensor.dtype.is_floating_point:
            raise DatasetMismatch(
                f"model input {spec.name!r} expects {spec.dtype}; the dataset's {label!r} is "
                f"{_dtype_name(tensor)} (floating values cannot become indices)"
            )
        cast.append(tensor.to(want))
    return Dataset(inputs=tuple(cast), targets=dataset.targets)
