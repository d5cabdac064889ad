"""What kind of dataset an upload is, decided from its content: arrays for programs (``inputs``
and ``targets`` in ``.npz``/``.safetensors``), token ids (``input_ids``) or text for language
models. The API's one call to check an uploaded dataset."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from safetensors import safe_open

from core.data import ArrayInfo, DatasetInfo, detect_dataset_format, inspect_dataset
from core.errors import InvalidDataset, UnsupportedFormat
from core.text import inspect_text_dataset, inspect_token_dataset

_HINT = (
    "Upload a .npz or .safetensors file holding 'inputs' (and optional 'targets'), token ids as "
    "'input_ids', or UTF-8 text (.txt, or .jsonl with a 'text' field)."
)


def inspect_any_dataset(path: str | os.PathLike[str]) -> DatasetInfo:
    """Validate and describe a dataset of any accepted kind.

    Raises:
        UnsupportedFormat: binary content that is none of them (a pickle, an image...).
        InvalidDataset: an accepted kind, malformed.
    """
    file = Path(path)
    with file.open("rb") as f:
        head = f.read(4096)
    fmt = detect_dataset_format(head[:16])
    if fmt is None:
        if b"\x00" in head:
            raise UnsupportedFormat(
                f"the dataset is binary but neither .npz nor .safetensors. {_HINT}"
            )
        text = inspect_text_dataset(file)
        return DatasetInfo(
            format=text.format, num_samples=text.num_samples, inputs=(), targets=None
        )
    if "input_ids" in _array_names(file, fmt):
        ids = inspect_token_dataset(file)
        shape = (ids.num_samples, ids.tokens_per_sample)
        return DatasetInfo(
            format=ids.format,
            num_samples=ids.num_samples,
            inputs=(ArrayInfo("input_ids", shape, ids.dtype),),
            targets=None,
        )
    return inspect_dataset(file)


def _array_names(path: Path, fmt: str) -> set[str]:
    """The array names in the file, read from its directory or header only."""
    try:
        if fmt == "npz":
            with zipfile.ZipFile(path) as zf:
                return {name.removesuffix(".npy") for name in zf.namelist()}
        with safe_open(str(path), framework="np") as f:
            return set(f.keys())
    except Exception as exc:  # zipfile and safetensors raise their own types on malformed files
        raise InvalidDataset(f"the dataset file is malformed: {exc}") from exc
