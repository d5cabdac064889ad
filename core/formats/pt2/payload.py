"""The weights and constants configs: every raw tensor member they point to, checked.

Pickled entries are refused (torch.export.load unpickles them with weights_only=False);
raw members must exist, lie in their folder and be large enough for the view they hold.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.accessors import json_int, json_key, json_list, json_obj, json_str
from core.formats.pt2.constants import CONSTANTS_CONFIG, DTYPES, INDEX, WEIGHTS_CONFIG

_WEIGHT_PATH_NAME: Final = re.compile(rf"weight_{INDEX}", re.ASCII)
_CONSTANT_PATH_NAME: Final = re.compile(rf"tensor_{INDEX}", re.ASCII)
_LAYOUT_STRIDED: Final = 7


@dataclass(frozen=True)
class Payload:
    """One weights/constants config entry, checked."""

    fqn: str
    path_name: str
    is_param: bool
    dtype: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def check_payload_config(
    config_json: Mapping[str, Any], members: Mapping[str, zipfile.ZipInfo], kind: str
) -> dict[str, Payload]:
    """Check a weights or constants config and the raw members it points to."""
    where = WEIGHTS_CONFIG if kind == "weights" else CONSTANTS_CONFIG
    folder = "data/weights/" if kind == "weights" else "data/constants/"
    path_re = _WEIGHT_PATH_NAME if kind == "weights" else _CONSTANT_PATH_NAME
    config = json_obj(json_key(config_json, "config", where), f"{where}: config")
    out: dict[str, Payload] = {}
    for fqn, raw_entry in config.items():
        at = f"{where}: {fqn!r}"
        entry = json_obj(raw_entry, at)
        use_pickle = json_key(entry, "use_pickle", at)
        if use_pickle is not False:
            # torch.export.load unpickles these with weights_only=False.
            raise UnsafeArchive(
                f"{at} is stored as a pickle (use_pickle: {json.dumps(use_pickle)}). Shears "
                "does not accept pickled weights or constants because loading them runs "
                "arbitrary code."
            )
        path_name = json_str(json_key(entry, "path_name", at), f"{at}: path_name")
        if path_name.startswith(("custom_obj_", "opaque_obj_")):
            # torch unpickles these by name, whatever use_pickle says.
            raise UnsafeArchive(
                f"{at} is a pickled custom object ({path_name}); Shears does not load them."
            )
        if not path_re.fullmatch(path_name):
            raise InvalidArchive(f"{at} has an invalid path_name {path_name!r}.")
        info = members.get(folder + path_name)
        if info is None:
            raise InvalidArchive(f"{at} points to {folder}{path_name}, which is missing.")
        is_param = json_key(entry, "is_param", at)
        if not isinstance(is_param, bool):
            raise InvalidArchive(f"{at}: is_param must be true or false.")
        meta = json_obj(json_key(entry, "tensor_meta", at), f"{at}: tensor_meta")
        dtype = json_int(json_key(meta, "dtype", at), f"{at}: dtype")
        if dtype not in DTYPES:
            raise InvalidArchive(f"{at} has unknown dtype code {dtype}.")
        layout = meta.get("layout", _LAYOUT_STRIDED)
        if layout != _LAYOUT_STRIDED:
            raise InvalidArchive(
                f"{at} has layout {layout!r}; only strided tensors are stored raw."
            )
        sizes = _static_ints(json_key(meta, "sizes", at), f"{at}: sizes")
        strides = _static_ints(json_key(meta, "strides", at), f"{at}: strides")
        offset = _static_int(json_key(meta, "storage_offset", at), f"{at}: storage_offset")
        if len(strides) != len(sizes):
            raise InvalidArchive(f"{at} has {len(sizes)} sizes but {len(strides)} strides.")
        payload = Payload(fqn, path_name, is_param, dtype, sizes, strides, offset)
        itemsize = DTYPES[dtype][1]
        if info.file_size % itemsize:
            raise InvalidArchive(
                f"{at}: {folder}{path_name} is {info.file_size} bytes, not a multiple of the "
                f"{DTYPES[dtype][0]} element size."
            )
        needed = _storage_bytes(sizes, strides, offset, itemsize)
        # The member holds the whole storage, which may be larger than this view (torch writes
        # one member per storage and views of it share it, with an offset).
        if info.file_size < needed:
            raise InvalidArchive(
                f"{at} needs {needed} bytes but {folder}{path_name} holds {info.file_size}."
            )
        out[fqn] = payload
    return out


def _storage_bytes(
    sizes: tuple[int, ...], strides: tuple[int, ...], offset: int, itemsize: int
) -> int:
    if any(s == 0 for s in sizes):
        return 0
    last = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True))
    return (last + 1) * itemsize


def _static_ints(value: object, where: str) -> tuple[int, ...]:
    return tuple(
        _static_int(item, f"{where}[{i}]") for i, item in enumerate(json_list(value, where))
    )


def _static_int(value: object, where: str) -> int:
    entry = json_obj(value, where)
    number = json_int(json_key(entry, "as_int", where), where)
    if number < 0:
        raise InvalidArchive(f"{where} is negative.")
    return number
