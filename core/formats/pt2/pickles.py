"""The pickled sample inputs: the one pickle a ``.pt2`` may hold, proven inert.

torch.export.load retries a failing ``weights_only=True`` load of
``data/sample_inputs/model.pt`` with ``weights_only=False``, so the member must be a plain
``torch.save`` of tensors: its opcodes are scanned, then ``torch.load(weights_only=True)``
must read it.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from typing import Final

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.constants import DTYPES, INDEX, SAMPLE_INPUTS, ArchiveLimits
from core.formats.pt2.container import check_whitelist, open_zip, read_member
from core.formats.pt2.sniff import detect_format

# The members of a new-format ``torch.save`` zip (what torch writes for the sample inputs).
_TORCH_SAVE_MEMBERS: Final = tuple(
    re.compile(pattern, re.ASCII)
    for pattern in (
        r"data\.pkl",
        r"\.format_version",
        r"\.storage_alignment",
        r"byteorder",
        r"version",
        r"\.data/version",
        r"\.data/serialization_id",
        rf"data/{INDEX}",
    )
)

# Globals a torch.save of plain tensors references (checked before torch.load as a second,
# independent line of defence next to weights_only=True).
_PICKLE_GLOBALS: Final = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "device"),
        ("torch.storage", "UntypedStorage"),
    }
    | {("torch", name) for name, _ in DTYPES.values()}
)
_PICKLE_STORAGE_CLASS: Final = re.compile(r"[A-Z][A-Za-z0-9]*Storage", re.ASCII)
_PICKLE_STRING_OPS: Final = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_PICKLE_PUT_OPS: Final = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_PICKLE_GET_OPS: Final = frozenset({"GET", "BINGET", "LONG_BINGET"})
# INST/OBJ import and call classes named in the stream; EXT* use the copyreg registry.
_PICKLE_FORBIDDEN_OPS: Final = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})
_PICKLE_NO_STACK_EFFECT: Final = frozenset({"PROTO", "FRAME", "STOP", "MEMOIZE"})


def check_sample_inputs(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    """Prove the sample inputs load without running code, before torch.export.load tries.

    torch.export.load retries a failing weights_only=True load with weights_only=False, so a
    member that is not a plain torch.save of tensors is refused outright.
    """
    what = SAMPLE_INPUTS
    data = read_member(zf, info, limits.max_json_bytes, what)
    if not data:
        return  # torch writes an empty member when the program has no example inputs
    if detect_format(data[:8]) != "zip":
        raise UnsafeArchive(
            f"{what} is not a torch.save zip (raw pickles are refused: torch.export.load would "
            "unpickle it with weights_only=False)."
        )
    inner, _, inner_members = open_zip(io.BytesIO(data), len(data), limits, what)
    with inner:
        check_whitelist(inner_members, _TORCH_SAVE_MEMBERS, what)
        pkl_info = inner_members.get("data.pkl")
        if pkl_info is None:
            raise UnsafeArchive(f"{what} has no data.pkl; it is not a torch.save file.")
        _scan_pickle(read_member(inner, pkl_info, limits.max_json_bytes, what), what)

    import torch  # lazily: importing the gate must stay cheap (no torch)

    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        # Note: torch.export.save(..., pickle_protocol=4) itself writes sample inputs that
        # weights_only=True rejects (it does not support the FRAME opcode), so torch.export.load
        # always unpickles those with weights_only=False; they are refused like any other.
        raise UnsafeArchive(
            f"{what} does not load with torch.load(weights_only=True) "
            f"({type(exc).__name__}); torch.export.load would retry it with "
            "weights_only=False, which runs arbitrary code. Save the program with "
            "torch.export.save's default pickle_protocol."
        ) from exc
    if not (
        isinstance(loaded, tuple)
        and len(loaded) == 2
        and isinstance(loaded[0], tuple)
        and isinstance(loaded[1], dict)
    ):
        raise InvalidArchive(f"{what} does not hold (args, kwargs) example inputs.")


def _scan_pickle(data: bytes, what: str) -> None:
    """Refuse a pickle that imports anything but the tensor-rebuilding helpers.

    STACK_GLOBAL takes its module/name from the stack, so string pushes (and memo round trips
    of them) are tracked; anything the tracker cannot resolve is refused.
    """
    recent: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _PICKLE_FORBIDDEN_OPS:
                raise UnsafeArchive(f"{what} uses the pickle opcode {name}.")
            if name in _PICKLE_STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in _PICKLE_PUT_OPS:
                memo[_memo_index(arg)] = recent[-1] if recent else None
            elif name in _PICKLE_GET_OPS:
                recent.append(memo.get(_memo_index(arg)))
            elif name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
                _check_pickle_global(module, qualname, what)
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                    raise UnsafeArchive(f"{what} imports a global the gate cannot resolve.")
                _check_pickle_global(recent[-2], recent[-1], what)
                recent.append(None)
            elif name not in _PICKLE_NO_STACK_EFFECT:
                recent.append(None)
    except UnsafeArchive:
        raise
    except Exception as exc:  # pickletools raises ValueError on malformed streams
        raise UnsafeArchive(f"{what} is not a well-formed pickle ({exc}).") from exc


def _memo_index(arg: object) -> int:
    if not isinstance(arg, int):
        raise UnsafeArchive("A pickle memo opcode has no index.")
    return arg


def _check_pickle_global(module: str, qualname: str, what: str) -> None:
    if (module, qualname) in _PICKLE_GLOBALS:
        return
    if module == "torch" and _PICKLE_STORAGE_CLASS.fullmatch(qualname):
        return
    raise UnsafeArchive(
        f"{what} references {module + '.' + qualname!a}; sample inputs may only hold "
        "tensors (a pickle that imports other objects can run arbitrary code)."
    )
