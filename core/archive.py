"""The upload gate for ``torch.export`` programs (``.pt2`` archives).

Why this exists: ``torch.export.load`` is not safe on untrusted files. Measured on torch 2.13:

* ``data/sample_inputs/model.pt`` is read with ``torch.load(weights_only=True)`` and, when that
  fails, *again* with ``weights_only=False``: a pickle with a malicious ``__reduce__`` runs.
* Weights and constants with ``use_pickle: true`` are read with ``weights_only=False``;
  ``custom_obj_*``/``opaque_obj_*`` constants go through ``torch._C._pickle_load_obj`` /
  ``pickle.loads`` whatever their config says.
* Every ``expr_str`` in ``models/model.json`` goes through ``sympy.sympify``, which hands its
  input to ``eval()``: ``"__import__('os').system(...)"`` runs during ``torch.export.load``.
* ``guards_code`` in ``models/model.json`` is pasted into Python source, compiled with
  ``exec()`` by ``ExportedProgram.module()`` and runs on the first call of the module.
* Node targets are resolved by ``getattr`` on ``torch``/``operator``: ``_operator.attrgetter`` +
  ``_operator.call`` reach any Python object and ``aten::from_file`` reads/writes files when the
  program runs.

So Shears never hands an upload to ``torch.export.load`` before :func:`inspect_archive` passed it,
and the API reads metadata through this module without deserialising anything. The gate decides
from the bytes (never the file name), checks the zip container against the layout torch 2.13
writes, allows only member names that format defines, refuses every pickle torch would load
unsafely, validates every string torch would ``eval``/``exec``/``getattr``, and only then reports
what the program looks like -- all from JSON metadata, without calling ``torch.export.load``.

Callers must load exactly the bytes that were gated (keep the upload immutable between the gate
and the load); the gate cannot protect a file that changes after it returned.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import pickletools
import re
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Final, NoReturn

from core.errors import InvalidArchive, UnsafeArchive, UnsupportedFormat
from core.formats.base import DynamicDim, ModelInfo, ProgramInput, PrunableLayer

__all__ = [
    "ArchiveInfo",
    "ArchiveLimits",
    "DynamicDim",
    "ProgramInput",
    "PrunableLayer",
    "detect_format",
    "inspect_archive",
]


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveInfo(ModelInfo):
    """What the gate learnt about a ``.pt2`` program, from its JSON metadata only."""

    prefix: str
    torch_version: str
    schema_version: str

    def details(self) -> dict[str, Any]:
        return {"torch_version": self.torch_version, "schema_version": self.schema_version}


@dataclass(frozen=True)
class ArchiveLimits:
    """Resource limits of the gate.

    ``max_json_bytes`` caps every member the gate reads into memory: the JSON members and the
    pickled sample inputs. Weight members are never read, only their sizes are checked.
    """

    max_members: int = 100_000
    max_total_bytes: int = 64 * 1024**3
    max_json_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0


# --------------------------------------------------------------------------------------------
# Format constants (derived from what torch 2.13 writes; see torch/export/pt2_archive/)
# --------------------------------------------------------------------------------------------

_EXPORT_HINT: Final = (
    "Export the model with torch.export.export(model, example_inputs) and save it with "
    'torch.export.save(program, "model.pt2"), then upload that file.'
)

_ZIP_LOCAL_MAGIC: Final = b"PK\x03\x04"
_ZIP_EMPTY_MAGIC: Final = b"PK\x05\x06"
_EOCD_SIG: Final = b"PK\x05\x06"
_EOCD_SIZE: Final = 22
_ZIP64_LOCATOR_SIG: Final = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE: Final = 20
_ZIP64_EOCD_SIG: Final = b"PK\x06\x06"
_ZIP64_EOCD_SIZE: Final = 56
_LOCAL_HEADER_SIZE: Final = 30
# The central directory is read into memory by zipfile before we can look at a single entry,
# so bound it from the end record first. Torch's entries are ~100 bytes; 4 KiB is generous.
_MAX_CD_BYTES_PER_ENTRY: Final = 4096

# Protocol 0/1 pickles have no magic number. These are the opcodes such a pickle realistically
# starts with (MARK, GLOBAL, EMPTY_LIST/DICT/TUPLE, NONE, INT, LONG, FLOAT, STRING, UNICODE).
_TEXT_PICKLE_FIRST: Final = frozenset(b"(c]})NILFSV")

_INDEX = r"(?:0|[1-9][0-9]{0,8})"

# Every member name a torch 2.13 ``torch.export.save`` archive holds, relative to its single top
# folder. Only the model name "model" is accepted: torch.export.save always writes that name and
# torch.export.load deserialises *every* models/*.json it finds. Deliberately absent: the legacy
# data/weights/model.pt and data/constants/model.pt (pickled state dicts, loaded with
# weights_only=False), data/constants/custom_obj_* and opaque_obj_* (torchbind/pickle objects),
# data/aotinductor/ (compiled shared objects), data/executorch/, data/mtia, xl_model_weights/
# and extra/ (free-form files Shears never reads).
_PT2_MEMBERS: Final = tuple(
    re.compile(pattern, re.ASCII)
    for pattern in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"\.data/version",
        r"\.data/serialization_id",
        r"models/model\.json",
        r"data/weights/model_weights_config\.json",
        rf"data/weights/weight_{_INDEX}",
        r"data/constants/model_constants_config\.json",
        rf"data/constants/tensor_{_INDEX}",
        r"data/sample_inputs/model\.pt",
    )
)

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
        rf"data/{_INDEX}",
    )
)

_MODEL_JSON: Final = "models/model.json"
_M: Final = f"{_MODEL_JSON}: "  # prefix of locations inside model.json in messages
_WEIGHTS_CONFIG: Final = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG: Final = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS: Final = "data/sample_inputs/model.pt"
_WEIGHT_PATH_NAME: Final = re.compile(rf"weight_{_INDEX}", re.ASCII)
_CONSTANT_PATH_NAME: Final = re.compile(rf"tensor_{_INDEX}", re.ASCII)
_SUPPORTED_SCHEMA_MAJOR: Final = 8  # torch 2.13 refuses any other major version

# torch._export.serde.schema.ScalarType -> (torch dtype name, element size in bytes).
_DTYPES: Final[Mapping[int, tuple[str, int]]] = {
    1: ("uint8", 1),
    2: ("int8", 1),
    3: ("int16", 2),
    4: ("int32", 4),
    5: ("int64", 8),
    6: ("float16", 2),
    7: ("float32", 4),
    8: ("float64", 8),
    9: ("complex32", 4),
    10: ("complex64", 8),
    11: ("complex128", 16),
    12: ("bool", 1),
    13: ("bfloat16", 2),
    28: ("uint16", 2),
    29: ("float8_e4m3fn", 1),
    30: ("float8_e5m2", 1),
    31: ("float8_e4m3fnuz", 1),
    32: ("float8_e5m2fnuz", 1),
    33: ("float8_e8m0fnu", 1),
    34: ("uint32", 4),
    35: ("uint64", 8),
}
_LAYOUT_STRIDED: Final = 7

# --- node targets --------------------------------------------------------------------------

_OPS_TARGET: Final = re.compile(
    r"torch\.ops\.(aten|prims)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)", re.ASCII
)
_HOP_TARGET: Final = re.compile(r"torch\.ops\.higher_order\.([A-Za-z_][A-Za-z0-9_]*)", re.ASCII)
# aten ops that touch the file system or the process-wide RNG when the program runs.
_FORBIDDEN_ATEN: Final = frozenset({"from_file", "save", "seed", "manual_seed"})
# Higher-order ops torch emits for plain models (control flow, no_grad/autocast regions,
# repeated submodules). Not: triton kernels, delegates, torchbind calls, effect tokens.
_HIGHER_ORDER_OPS: Final = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "invoke_subgraph",
    }
)
# Python-level targets torch writes for symbolic-shape arithmetic. An explicit list because
# "_operator" also holds attrgetter/methodcaller/call, which reach arbitrary objects.
_PYTHON_TARGETS: Final = frozenset(
    {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "truediv", "floordiv")}
    | {f"_operator.{name}" for name in ("mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt")}
    | {f"_operator.{name}" for name in ("le", "gt", "ge", "and_", "or_", "xor", "not_")}
    | {f"_operator.{name}" for name in ("invert", "lshift", "rshift")}
    | {f"torch.{name}" for name in ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min")}
    | {f"torch.{name}" for name in ("sym_sqrt", "sym_not", "sym_sum")}
    | {"math.trunc", "math.floor", "math.ceil"}
)

# --- prunable layers -----------------------------------------------------------------------

_LAYER_OPS: Final[Mapping[str, str]] = {
    "torch.ops.aten.conv1d.default": "conv1d",
    "torch.ops.aten.conv1d.padding": "conv1d",
    "torch.ops.aten.conv2d.default": "conv2d",
    "torch.ops.aten.conv2d.padding": "conv2d",
    "torch.ops.aten.conv3d.default": "conv3d",
    "torch.ops.aten.conv3d.padding": "conv3d",
    "torch.ops.aten.conv_transpose1d.input": "conv_transpose1d",
    "torch.ops.aten.conv_transpose2d.input": "conv_transpose2d",
    "torch.ops.aten.conv_transpose3d.input": "conv_transpose3d",
    "torch.ops.aten.linear.default": "linear",
    "torch.ops.aten.convolution.default": "",  # kind from the weight rank + transposed flag
}
_WEIGHT_RANK: Final[Mapping[str, int]] = {
    "conv1d": 3,
    "conv2d": 4,
    "conv3d": 5,
    "conv_transpose1d": 3,
    "conv_transpose2d": 4,
    "conv_transpose3d": 5,
    "linear": 2,
}

# --- symbolic expressions (sympy.srepr, what serialize_sym_int writes) -----------------------

_MAX_EXPR_CHARS: Final = 10_000
# Characters torch's printers use. Everything else is refused before parsing: comments (#) hide
# text from the syntax tree, newlines/quotes/backslashes could break out of the source line torch
# pastes a guard into, and Python NFKC-normalises non-ASCII identifiers (fullwidth "eval" is
# eval).
_CODE_CHARS: Final = re.compile(r"[A-Za-z0-9_ ()\[\],.'=<>!+\-*/%&|^~]*", re.ASCII)
_MAX_GUARDS: Final = 10_000
_MAX_LITERAL: Final = 2**63
# sympy evaluates powers of numbers eagerly ((2*s)**n expands 2**n): bound them so a crafted
# expression cannot stall torch.export.load (or this gate).
_MAX_POW_EXPONENT: Final = 64
_MAX_POWS: Final = 3
_POW_FUNCS: Final = frozenset({"Pow", "PowByNatural", "FloatPow"})
# Callables that sympify may meet in a torch expression: sympy constructors plus the functions
# the torch deserializer registers (torch/_export/serde/serialize.py, sympy_functions). All are
# pure constructors of symbolic values.
_EXPR_FUNCS: Final = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "IntInfinity",
        "NegativeIntInfinity",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    }
)
_EXPR_FUNC_PATTERN: Final = re.compile(
    r"OpaqueUnaryFn_[a-z0-9]+|BitwiseFn_bitwise_(?:and|or|xor)", re.ASCII
)
_EXPR_CONSTANTS: Final = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo", "pi", "E"})
_SYMBOL_NAME: Final = re.compile(r"[a-z]+[0-9]+", re.ASCII)
_EXPR_STRING: Final = re.compile(r"[A-Za-z0-9_.+\-]{1,64}", re.ASCII)
_EXPR_KEYWORDS: Final = frozenset(
    {
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "infinite",
        "zero",
        "nonzero",
        "even",
        "odd",
        "rational",
        "commutative",
        "precision",
    }
)

# --- guards_code (Python source exec'd by ExportedProgram.module()) -------------------------

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_GUARD_CALLS: Final = frozenset(
    {
        "abs",
        "max",
        "min",
        "round",
        "int",
        "float",
        "IsNonOverlappingAndDenseIndicator",
        "cast_symbool_to_symint_guardless",
    }
)
_GUARD_MATH: Final = frozenset(
    {"floor", "ceil", "trunc", "sqrt", "log2", "inf", "nan", "pi", "e"}
    | {"cos", "cosh", "acos", "sin", "sinh", "asin", "tan", "tanh", "atan", "exp", "log"}
)
_GUARD_TORCH: Final = frozenset(
    {"sym_float", "sym_int", "sym_max", "sym_min", "sym_sqrt", "_sym_sqrt", "sym_not", "sym_ite"}
)
_GUARD_TENSOR_METHODS: Final = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_BINOPS: Final = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.LShift,
    ast.RShift,
    ast.BitAnd,
    ast.BitOr,
    ast.BitXor,
)
_GUARD_UNARYOPS: Final = (ast.USub, ast.UAdd, ast.Not, ast.Invert)
_GUARD_CMPOPS: Final = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)

# --- pickles ---------------------------------------------------------------------------------

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
    | {("torch", name) for name, _ in _DTYPES.values()}
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
_PICKLE_OPCODES: Final = frozenset(op.code for op in pickletools.opcodes)
_PICKLE_NO_STACK_EFFECT: Final = frozenset({"PROTO", "FRAME", "STOP", "MEMOIZE"})


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def detect_format(head: bytes) -> str:
    """Classify a file from its first bytes: ``"zip"``, ``"pickle"`` or ``"unknown"``.

    Only the first 8 bytes are looked at. Protocol 0/1 pickles have no magic number, so those
    are recognised heuristically from their first opcode; the answer only chooses the wording
    of the refusal, both are refused.
    """
    head = head[:8]
    if head.startswith(_ZIP_LOCAL_MAGIC) or head.startswith(_ZIP_EMPTY_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return "pickle"
    if head and head[0] in _TEXT_PICKLE_FIRST and _looks_like_text_pickle(head):
        return "pickle"
    return "unknown"


def claims_pt2(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a zip archive: the container a ``.pt2`` program comes in."""
    with open(path, "rb") as fh:
        return detect_format(fh.read(8)) == "zip"


def inspect_archive(
    path: str | os.PathLike[str], limits: ArchiveLimits = ArchiveLimits()
) -> ArchiveInfo:
    """Gate an uploaded file and describe the ``torch.export`` program it holds.

    Raises :class:`UnsupportedFormat` for anything that is not a ``.pt2`` (pickles, TorchScript,
    ``torch.save`` checkpoints, other zips, unknown bytes), :class:`UnsafeArchive` for anything
    that could run code, escape its folder or exhaust resources when loaded, and
    :class:`InvalidArchive` for malformed or inconsistent archives. Returns only when the file
    is safe to hand to ``torch.export.load``. Nothing is written to disk and no weight is read.
    ``OSError`` from opening ``path`` propagates (that is the caller's file, not the upload).
    """
    _check_limits(limits)
    with open(path, "rb") as fh:
        file_stat = os.fstat(fh.fileno())
        if not stat.S_ISREG(file_stat.st_mode):
            raise InvalidArchive("The upload is not a regular file.")
        size = file_stat.st_size
        head = fh.read(8)
        kind = detect_format(head)
        if kind == "pickle":
            raise UnsupportedFormat(
                "The upload is a Python pickle (for example torch.save(model) or pickle.dump). "
                "Shears refuses pickled modules because unpickling runs arbitrary code. "
                + _EXPORT_HINT
            )
        if kind != "zip":
            raise UnsupportedFormat(
                "The upload is not a torch.export program (unrecognised content). " + _EXPORT_HINT
            )
        fh.seek(0)
        zf, prefix, members = _open_zip(fh, size, limits, "The upload")
        with zf:
            _classify_zip(zf, prefix, members)
            _check_whitelist(members, _PT2_MEMBERS, "The archive")
            return _inspect_pt2(zf, prefix, members, limits)


# --------------------------------------------------------------------------------------------
# Zip container
# --------------------------------------------------------------------------------------------


def _check_limits(limits: ArchiveLimits) -> None:
    if (
        limits.max_members < 1
        or limits.max_total_bytes < 1
        or limits.max_json_bytes < 1
        or not limits.max_compression_ratio >= 1.0
    ):
        raise ValueError(f"ArchiveLimits must be positive, got {limits!r}")


def _open_zip(
    fh: IO[bytes], size: int, limits: ArchiveLimits, what: str
) -> tuple[zipfile.ZipFile, str, dict[str, zipfile.ZipInfo]]:
    """Open a zip after checking its container; return it, its top folder and rel-name map.

    Everything here looks at names and headers only, never at member content.
    """
    n_entries, cd_offset = _check_end_records(fh, size, limits, what)
    try:
        zf = zipfile.ZipFile(fh)
    except Exception as exc:  # zipfile raises a zoo of types on malformed input
        raise InvalidArchive(f"{what} is not a readable zip archive ({exc}).") from exc
    try:
        infos = zf.infolist()
        if len(infos) != n_entries:
            # zipfile walks the central directory by size, miniz (torch) by count.
            raise UnsafeArchive(
                f"{what} declares {n_entries} members but its central directory holds "
                f"{len(infos)}; readers would disagree on its content."
            )
        prefix, members = _check_names(infos, what)
        _check_entries(infos, limits, what)
        _check_local_headers(fh, infos, cd_offset, what)
    except BaseException:
        zf.close()
        raise
    return zf, prefix, members


def _check_end_records(
    fh: IO[bytes], size: int, limits: ArchiveLimits, what: str
) -> tuple[int, int]:
    """Validate the end-of-central-directory records; return (entry count, directory offset).

    Runs before zipfile parses anything, so an absurd central directory is refused before it
    is read into memory. Comments, trailing and prepended data are refused because zip readers
    (Python's zipfile, torch's miniz) resolve them differently.
    """
    if size < _EOCD_SIZE:
        raise InvalidArchive(f"{what} is truncated (too short to be a zip archive).")
    fh.seek(size - _EOCD_SIZE)
    eocd = fh.read(_EOCD_SIZE)
    if eocd[:4] != _EOCD_SIG:
        fh.seek(max(0, size - 65_557))
        if _EOCD_SIG in fh.read():
            raise UnsafeArchive(
                f"{what} has a zip comment or data after the end of the archive; "
                "Shears refuses them because zip readers disagree on such files."
            )
        raise InvalidArchive(f"{what} is truncated or corrupt (no zip end record).")
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = struct.unpack(
        "<4sHHHHIIH", eocd
    )
    if comment_len != 0:
        raise InvalidArchive(f"{what} is truncated (its zip comment is cut off).")
    cd_end = size - _EOCD_SIZE
    loc_pos = cd_end - _ZIP64_LOCATOR_SIZE
    locator = b""
    if loc_pos >= 0:
        fh.seek(loc_pos)
        locator = fh.read(_ZIP64_LOCATOR_SIZE)
    saturated = n_total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
    # torch (miniz) writes the zip64 end records on every archive, not only large ones.
    if locator[:4] == _ZIP64_LOCATOR_SIG:
        # Python's zipfile assumes the zip64 end record sits right before the locator while
        # miniz follows the locator's offset: require both to agree, and the classic record
        # to repeat the zip64 values wherever it is not saturated.
        _, loc_disk, rec_offset, n_disks = struct.unpack("<4sIQI", locator)
        rec_pos = loc_pos - _ZIP64_EOCD_SIZE
        if rec_pos < 0:
            raise InvalidArchive(f"{what} has a truncated zip64 end record.")
        fh.seek(rec_pos)
        rec = struct.unpack("<4sQHHIIQQQQ", fh.read(_ZIP64_EOCD_SIZE))
        _, _, _, _, disk64, cd_disk64, n_disk64, n_total64, cd_size64, cd_offset64 = rec
        if (
            rec[0] != _ZIP64_EOCD_SIG
            or rec_offset != rec_pos
            or rec[1] != _ZIP64_EOCD_SIZE - 12
            or loc_disk != 0
            or n_disks != 1
            or n_total not in (0xFFFF, n_total64)
            or n_disk not in (0xFFFF, n_disk64)
            or cd_size not in (0xFFFFFFFF, cd_size64)
            or cd_offset not in (0xFFFFFFFF, cd_offset64)
        ):
            raise UnsafeArchive(f"{what} has an inconsistent zip64 end record.")
        disk, cd_disk, n_disk, n_total = disk64, cd_disk64, n_disk64, n_total64
        cd_size, cd_offset, cd_end = cd_size64, cd_offset64, rec_pos
    elif saturated:
        raise InvalidArchive(f"{what} lacks the zip64 end record its end record refers to.")
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise InvalidArchive(f"{what} is a multi-part zip archive.")
    if n_total > limits.max_members:
        raise UnsafeArchive(f"{what} has {n_total} members; the limit is {limits.max_members}.")
    if cd_offset + cd_size != cd_end:
        raise UnsafeArchive(
            f"{what} has data before its zip entries or between its central directory "
            "and end record; Shears refuses it because zip readers disagree on such files."
        )
    if cd_size > max(n_total, 1) * _MAX_CD_BYTES_PER_ENTRY:
        raise UnsafeArchive(f"{what} has an oversized zip central directory.")
    return n_total, cd_offset


def _check_names(infos: list[zipfile.ZipInfo], what: str) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Refuse names that could escape the extraction folder or confuse a reader.

    Returns the single top folder and the members keyed by their name below it.
    """
    prefix: str | None = None
    members: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    for info in infos:
        # orig_filename is the name before zipfile cut it at the first NUL; miniz keeps it all.
        name = info.orig_filename
        shown = ascii(name)
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
            raise UnsafeArchive(
                f"{what} has a member name with a NUL or control character: {shown}."
            )
        if "\\" in name:
            raise UnsafeArchive(f"{what} has a member name with a backslash: {shown}.")
        if name.startswith("/") or re.match(r"[A-Za-z]:", name):
            raise UnsafeArchive(f"{what} has an absolute member name: {shown}.")
        parts = name.split("/")
        if ".." in parts:
            raise UnsafeArchive(f"{what} has a member name with '..': {shown}.")
        if any(part in ("", ".") for part in parts):
            raise UnsafeArchive(
                f"{what} has a directory entry or an empty/'.' path component: {shown}."
            )
        if len(parts) < 2:
            raise UnsafeArchive(f"{what} has a member outside its top folder: {shown}.")
        if prefix is None:
            prefix = parts[0]
        elif parts[0] != prefix:
            raise UnsafeArchive(
                f"{what} has members outside its single top folder ({prefix!a} and {parts[0]!a})."
            )
        rel = "/".join(parts[1:])
        if rel in members:
            raise UnsafeArchive(f"{what} has a duplicate member: {shown}.")
        # miniz (torch's zip reader) looks names up case-insensitively.
        if name.casefold() in folded:
            raise UnsafeArchive(f"{what} has members whose names differ only in case: {shown}.")
        folded.add(name.casefold())
        members[rel] = info
    return prefix or "", members


def _check_entries(infos: list[zipfile.ZipInfo], limits: ArchiveLimits, what: str) -> None:
    total = 0
    for info in infos:
        shown = ascii(info.orig_filename)
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise UnsafeArchive(f"{what} member {shown} is {kind}.")
        if info.external_attr & 0x10:  # MS-DOS directory attribute
            raise UnsafeArchive(f"{what} member {shown} is a directory.")
        if info.flag_bits & 0x41:  # traditional or strong encryption
            raise UnsafeArchive(f"{what} member {shown} is encrypted.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidArchive(
                f"{what} member {shown} uses zip compression method "
                f"{info.compress_type}; torch archives use stored or deflate."
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise InvalidArchive(f"{what} member {shown} has inconsistent sizes.")
        if info.file_size > 0:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise UnsafeArchive(
                    f"{what} member {shown} expands {ratio:.0f}x when decompressed "
                    f"(limit {limits.max_compression_ratio:g}x): refused as a zip bomb."
                )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise UnsafeArchive(f"{what} expands to more than {limits.max_total_bytes} bytes.")


def _check_local_headers(
    fh: IO[bytes], infos: list[zipfile.ZipInfo], cd_offset: int, what: str
) -> None:
    """Compare every local header with its central entry and refuse overlapping members.

    Overlapping entries are how non-recursive zip bombs reuse one compressed blob many times;
    a local header that disagrees with the central directory is read differently by readers
    that trust one or the other.
    """
    end_of_previous = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        shown = ascii(info.orig_filename)
        if info.header_offset < end_of_previous:
            raise UnsafeArchive(f"{what} member {shown} overlaps another member.")
        fh.seek(info.header_offset)
        raw = fh.read(_LOCAL_HEADER_SIZE)
        if len(raw) != _LOCAL_HEADER_SIZE or raw[:4] != _ZIP_LOCAL_MAGIC:
            raise InvalidArchive(f"{what} member {shown} has no valid local header.")
        (_, _, flags, method, _, _, _, csize, usize, name_len, extra_len) = struct.unpack(
            "<4sHHHHHIIIHH", raw
        )
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if fh.read(name_len) != info.orig_filename.encode(encoding):
            raise UnsafeArchive(f"{what} member {shown} has a different name in its local header.")
        if method != info.compress_type or (flags & 0x41) != (info.flag_bits & 0x41):
            raise UnsafeArchive(f"{what} member {shown} disagrees with its local header.")
        sizes_in_header = not flags & 0x08 and 0xFFFFFFFF not in (csize, usize)
        if sizes_in_header and (csize, usize) != (info.compress_size, info.file_size):
            raise UnsafeArchive(f"{what} member {shown} has different sizes in its local header.")
        data_start = info.header_offset + _LOCAL_HEADER_SIZE + name_len + extra_len
        end_of_previous = data_start + info.compress_size
        if end_of_previous > cd_offset:
            raise InvalidArchive(f"{what} member {shown} runs past the end of the data.")
    if infos and min(i.header_offset for i in infos) != 0:
        raise UnsafeArchive(f"{what} has data before its first member.")


def _check_whitelist(
    members: Mapping[str, zipfile.ZipInfo], patterns: tuple[re.Pattern[str], ...], what: str
) -> None:
    for rel, info in members.items():
        if not any(pattern.fullmatch(rel) for pattern in patterns):
            raise UnsafeArchive(
                f"{what} has a member the torch.export format does not define: "
                f"{info.orig_filename!a}."
            )


def _classify_zip(zf: zipfile.ZipFile, prefix: str, members: Mapping[str, zipfile.ZipInfo]) -> None:
    """Refuse zips that are some other torch format, by their member names."""
    if "constants.pkl" in members or any(rel.startswith("code/") for rel in members):
        raise UnsupportedFormat(
            "The upload is a TorchScript archive (torch.jit.save). Shears only accepts "
            "torch.export programs. " + _EXPORT_HINT
        )
    if "data.pkl" in members:
        raise UnsupportedFormat(
            "The upload is a torch.save checkpoint (a pickle inside a zip). Shears refuses "
            "pickled modules because unpickling runs arbitrary code. " + _EXPORT_HINT
        )
    if "archive_format" not in members:
        raise UnsupportedFormat(
            "The upload is a zip archive but not a torch.export program (it has no "
            "archive_format member). " + _EXPORT_HINT
        )


# --------------------------------------------------------------------------------------------
# Reading members
# --------------------------------------------------------------------------------------------


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, what: str) -> bytes:
    if info.file_size > cap:
        raise InvalidArchive(
            f"{what} is {info.file_size} bytes; Shears reads at most {cap} bytes of it."
        )
    try:
        with zf.open(info) as member:
            # The declared size was checked; read one byte more in case the data disagrees.
            data = member.read(cap + 1)
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, ...
        raise InvalidArchive(f"{what} is corrupt ({exc}).") from exc
    if len(data) > cap:
        raise InvalidArchive(f"{what} is larger than its declared size.")
    return data


def _read_json(
    zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], rel: str, cap: int
) -> dict[str, Any]:
    info = _require_member(members, rel)
    data = _read_member(zf, info, cap, rel)
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArchive(f"{rel} is not valid JSON ({exc}).") from exc
    return _obj(parsed, rel)


def _require_member(members: Mapping[str, zipfile.ZipInfo], rel: str) -> zipfile.ZipInfo:
    info = members.get(rel)
    if info is None:
        raise InvalidArchive(f"The archive has no {rel} member; it is not a complete .pt2.")
    return info


# --------------------------------------------------------------------------------------------
# The pt2 checks
# --------------------------------------------------------------------------------------------


def _inspect_pt2(
    zf: zipfile.ZipFile,
    prefix: str,
    members: Mapping[str, zipfile.ZipInfo],
    limits: ArchiveLimits,
) -> ArchiveInfo:
    fmt = _read_member(zf, members["archive_format"], 64, "archive_format")
    if fmt != b"pt2":
        raise UnsupportedFormat(
            f"The upload is a zip archive with archive_format {fmt[:16]!r}, not a torch.export "
            "program. " + _EXPORT_HINT
        )
    version = _read_member(zf, _require_member(members, "archive_version"), 64, "archive_version")
    if version != b"0":
        raise InvalidArchive(
            f"The archive has archive_version {version[:16]!r}; this Shears reads version 0 "
            "(torch 2.13)."
        )
    if "byteorder" in members:
        order = _read_member(zf, members["byteorder"], 64, "byteorder")
        if order != b"little":
            raise InvalidArchive(f"The archive stores tensors in {order[:16]!r} byte order.")

    cap = limits.max_json_bytes
    weights = _check_payload_config(
        _read_json(zf, members, _WEIGHTS_CONFIG, cap), members, "weights"
    )
    constants = _check_payload_config(
        _read_json(zf, members, _CONSTANTS_CONFIG, cap), members, "constants"
    )
    model = _read_json(zf, members, _MODEL_JSON, cap)
    _check_model_code(model)
    _check_sample_inputs(zf, _require_member(members, _SAMPLE_INPUTS), limits)
    try:
        return _describe(prefix, model, weights, constants)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # The explicit checks should make this unreachable; never let a raw error escape.
        raise InvalidArchive(f"{_MODEL_JSON} is inconsistent ({exc!r}).") from exc


@dataclass(frozen=True)
class _Payload:
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


def _check_payload_config(
    config_json: Mapping[str, Any], members: Mapping[str, zipfile.ZipInfo], kind: str
) -> dict[str, _Payload]:
    """Check a weights or constants config and the raw members it points to."""
    where = _WEIGHTS_CONFIG if kind == "weights" else _CONSTANTS_CONFIG
    folder = "data/weights/" if kind == "weights" else "data/constants/"
    path_re = _WEIGHT_PATH_NAME if kind == "weights" else _CONSTANT_PATH_NAME
    config = _obj(_key(config_json, "config", where), f"{where}: config")
    out: dict[str, _Payload] = {}
    for fqn, raw_entry in config.items():
        at = f"{where}: {fqn!r}"
        entry = _obj(raw_entry, at)
        use_pickle = _key(entry, "use_pickle", at)
        if use_pickle is not False:
            # torch.export.load unpickles these with weights_only=False.
            raise UnsafeArchive(
                f"{at} is stored as a pickle (use_pickle: {json.dumps(use_pickle)}). Shears "
                "does not accept pickled weights or constants because loading them runs "
                "arbitrary code."
            )
        path_name = _str(_key(entry, "path_name", at), f"{at}: path_name")
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
        is_param = _key(entry, "is_param", at)
        if not isinstance(is_param, bool):
            raise InvalidArchive(f"{at}: is_param must be true or false.")
        meta = _obj(_key(entry, "tensor_meta", at), f"{at}: tensor_meta")
        dtype = _int(_key(meta, "dtype", at), f"{at}: dtype")
        if dtype not in _DTYPES:
            raise InvalidArchive(f"{at} has unknown dtype code {dtype}.")
        layout = meta.get("layout", _LAYOUT_STRIDED)
        if layout != _LAYOUT_STRIDED:
            raise InvalidArchive(
                f"{at} has layout {layout!r}; only strided tensors are stored raw."
            )
        sizes = _static_ints(_key(meta, "sizes", at), f"{at}: sizes")
        strides = _static_ints(_key(meta, "strides", at), f"{at}: strides")
        offset = _static_int(_key(meta, "storage_offset", at), f"{at}: storage_offset")
        if len(strides) != len(sizes):
            raise InvalidArchive(f"{at} has {len(sizes)} sizes but {len(strides)} strides.")
        payload = _Payload(fqn, path_name, is_param, dtype, sizes, strides, offset)
        itemsize = _DTYPES[dtype][1]
        if info.file_size % itemsize:
            raise InvalidArchive(
                f"{at}: {folder}{path_name} is {info.file_size} bytes, not a multiple of the "
                f"{_DTYPES[dtype][0]} element size."
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
    return tuple(_static_int(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where)))


def _static_int(value: object, where: str) -> int:
    entry = _obj(value, where)
    number = _int(_key(entry, "as_int", where), where)
    if number < 0:
        raise InvalidArchive(f"{where} is negative.")
    return number


# --- code the loader would eval / exec / getattr ---------------------------------------------


def _check_model_code(model: Mapping[str, Any]) -> None:
    """Validate every string of model.json that torch turns into code or a callable.

    The walk is generic so nested graphs (cond/map branches) are covered too. Only string
    values are checked: torch's schema decoder fails on any other type for these fields,
    and name-keyed maps (tensor_values, ...) hold objects, so an input that happens to be
    called "target" is not mistaken for a node target.
    """
    for key, value, where in _walk(model):
        if not isinstance(value, str):
            continue
        if key in ("target", "as_operator"):
            _check_target(value, where)
        elif key == "expr_str":
            _check_sym_expr(value, where)
    guards = model.get("guards_code", [])
    guard_list = _list(guards, "guards_code")
    if len(guard_list) > _MAX_GUARDS:
        raise InvalidArchive(f"{_MODEL_JSON} has {len(guard_list)} guards.")
    for i, guard in enumerate(guard_list):
        _check_guard(guard, f"guards_code[{i}]")


def _walk(root: object) -> Iterator[tuple[str, object, str]]:
    """Yield (key, value, path) for every dict entry in a JSON tree, without recursion."""
    stack: list[tuple[object, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{path}.{key}" if path else str(key)
                yield str(key), value, child
                stack.append((value, child))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))


def _check_target(target: object, where: str) -> None:
    if not isinstance(target, str):
        raise InvalidArchive(f"{_MODEL_JSON}: {where} is not a string.")
    shown = ascii(target)
    match = _OPS_TARGET.fullmatch(target)
    if match is not None:
        if match.group(1) == "aten" and match.group(2) in _FORBIDDEN_ATEN:
            raise UnsafeArchive(
                f"The program calls {shown}, which reads or writes files or global state; "
                "Shears refuses it."
            )
        return
    hop = _HOP_TARGET.fullmatch(target)
    if hop is not None and hop.group(1) in _HIGHER_ORDER_OPS:
        return
    if target in _PYTHON_TARGETS:
        return
    if target.startswith(("_operator.", "builtins.", "math.", "torch.")) and not target.startswith(
        "torch.ops."
    ):
        raise UnsafeArchive(
            f"The program calls the Python function {shown}, which Shears does not run."
        )
    raise InvalidArchive(
        f"The program uses the operator {shown}. Shears can only run standard PyTorch (aten) "
        "operators, not custom ops or anything that needs user code; re-export the model "
        "without custom operators."
    )


def _check_sym_expr(expr: object, where: str) -> None:
    """Accept only the sympy-constructor expressions torch writes (sympify eval()s them)."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        raise UnsafeArchive(f"{_MODEL_JSON}: {where} is not a plausible symbolic expression.")
    if not _CODE_CHARS.fullmatch(expr):
        _refuse_expr(expr, where)
    tree = _parse_expression(expr, where)
    pows = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or not (
                func.id in _EXPR_FUNCS or _EXPR_FUNC_PATTERN.fullmatch(func.id)
            ):
                _refuse_expr(expr, where)
            for keyword in node.keywords:
                if keyword.arg not in _EXPR_KEYWORDS or not isinstance(keyword.value, ast.Constant):
                    _refuse_expr(expr, where)
            if func.id in _POW_FUNCS:
                pows += 1
                if pows > _MAX_POWS or (len(node.args) == 2 and not _small_exponent(node.args[1])):
                    _refuse_expr(expr, where)
        elif isinstance(node, ast.Name):
            if not (
                node.id in _EXPR_FUNCS
                or _EXPR_FUNC_PATTERN.fullmatch(node.id)
                or node.id in _EXPR_CONSTANTS
                or _SYMBOL_NAME.fullmatch(node.id)
            ):
                _refuse_expr(expr, where)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                if not _EXPR_STRING.fullmatch(node.value):
                    _refuse_expr(expr, where)
            elif not _plain_number(node.value):
                _refuse_expr(expr, where)
        elif isinstance(node, ast.BinOp):
            # The older str() form ("s0 + 1"): arithmetic only.
            if not isinstance(
                node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
            ):
                _refuse_expr(expr, where)
            if isinstance(node.op, ast.Pow):
                pows += 1
                if pows > _MAX_POWS or not _small_exponent(node.right):
                    _refuse_expr(expr, where)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                _refuse_expr(expr, where)
        elif not isinstance(
            node, (ast.Expression, ast.keyword, ast.Load, ast.operator, ast.unaryop)
        ):
            _refuse_expr(expr, where)


def _small_exponent(node: ast.expr) -> bool:
    """True for a symbolic exponent or a numeric literal small enough to expand cheaply.

    A constant exponent that is itself an expression (``9 ** 9``, ``Add(Integer(1), ...)``)
    is refused: torch never writes one, and it would be folded before anything bounds it.
    """
    if _is_symbolic(node):
        return True
    value = _literal_number(node)
    return value is not None and abs(value) <= _MAX_POW_EXPONENT


def _is_symbolic(node: ast.expr) -> bool:
    """Whether an expression depends on a shape symbol or a program input."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and _SYMBOL_NAME.fullmatch(sub.id):
            return True
        if isinstance(sub, ast.Name) and sub.id in ("Symbol", "L"):
            return True
    return False


def _literal_number(node: ast.expr) -> float | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _literal_number(node.operand)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value) if _plain_number(node.value) else math.inf
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("Integer", "Float", "Rational")
        and node.args
    ):
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            try:
                return float(first.value)
            except ValueError:
                return math.inf
        return _literal_number(first)
    return None


def _plain_number(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= _MAX_LITERAL
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def _refuse_expr(expr: str, where: str) -> NoReturn:
    raise UnsafeArchive(
        f"{_MODEL_JSON}: {where} is not a symbolic shape expression torch writes: "
        f"{expr[:200]!a}. torch.export.load would evaluate it as Python code."
    )


def _parse_expression(source: str, where: str) -> ast.Expression:
    try:
        return ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnsafeArchive(
            f"{_MODEL_JSON}: {where} is not a valid expression: {source[:200]!a}."
        ) from exc


def _check_guard(guard: object, where: str) -> None:
    """Accept only shape guards over input sizes (ExportedProgram.module() exec()s them)."""
    if (
        not isinstance(guard, str)
        or len(guard) > _MAX_EXPR_CHARS
        or not _CODE_CHARS.fullmatch(guard)
    ):
        raise UnsafeArchive(f"{_MODEL_JSON}: {where} is not a plausible shape guard.")
    tree = _parse_expression(guard, where)
    pows = 0

    def refuse() -> NoReturn:
        raise UnsafeArchive(
            f"{_MODEL_JSON}: {where} is not a shape guard torch writes: {guard[:200]!a}. "
            "ExportedProgram.module() would execute it as Python code."
        )

    def is_input_ref(node: ast.expr) -> bool:
        # L['x'], L['x']['k'], L['xs'][0]: a user input, looked up by identifier or index.
        if not isinstance(node, ast.Subscript):
            return False
        key = node.slice
        if not isinstance(key, ast.Constant):
            return False
        if isinstance(key.value, str):
            if not _IDENTIFIER.fullmatch(key.value):
                return False
        elif not (isinstance(key.value, int) and not isinstance(key.value, bool)):
            return False
        if isinstance(node.value, ast.Name):
            return node.value.id == "L"
        return is_input_ref(node.value)

    def check(node: ast.expr) -> None:
        nonlocal pows
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                check(value)
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _GUARD_BINOPS):
                refuse()
            if isinstance(node.op, ast.Pow):
                pows += 1
                if pows > _MAX_POWS or not _small_exponent(node.right):
                    refuse()
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _GUARD_UNARYOPS):
                refuse()
            check(node.operand)
        elif isinstance(node, ast.Compare):
            if not all(isinstance(op, _GUARD_CMPOPS) for op in node.ops):
                refuse()
            check(node.left)
            for comparator in node.comparators:
                check(comparator)
        elif isinstance(node, ast.IfExp):
            check(node.test)
            check(node.body)
            check(node.orelse)
        elif isinstance(node, ast.Constant):
            if not _plain_number(node.value):
                refuse()
        elif isinstance(node, ast.Subscript):
            # L['x'].size()[0], L['x'].stride()[1]
            if is_input_ref(node):
                return
            call = node.value
            if not (
                isinstance(node.slice, ast.Constant)
                and type(node.slice.value) is int
                and isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("size", "stride")
            ):
                refuse()
            check(call)
        elif isinstance(node, ast.Call):
            if node.keywords:
                refuse()
            func = node.func
            if isinstance(func, ast.Name):
                if func.id not in _GUARD_CALLS:
                    refuse()
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                allowed = {"math": _GUARD_MATH, "torch": _GUARD_TORCH}.get(func.value.id)
                if allowed is None or func.attr not in allowed:
                    refuse()
            elif isinstance(func, ast.Attribute):
                if func.attr not in _GUARD_TENSOR_METHODS or not is_input_ref(func.value):
                    refuse()
                if node.args:
                    refuse()
            else:
                refuse()
            for arg in node.args:
                check(arg)
        elif isinstance(node, ast.Attribute):
            # math.inf, math.pi
            if not (
                isinstance(node.value, ast.Name)
                and node.value.id == "math"
                and node.attr in _GUARD_MATH
            ):
                refuse()
        else:
            refuse()

    check(tree.body)


# --- sample inputs ---------------------------------------------------------------------------


def _check_sample_inputs(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    """Prove the sample inputs load without running code, before torch.export.load tries.

    torch.export.load retries a failing weights_only=True load with weights_only=False, so a
    member that is not a plain torch.save of tensors is refused outright.
    """
    what = _SAMPLE_INPUTS
    data = _read_member(zf, info, limits.max_json_bytes, what)
    if not data:
        return  # torch writes an empty member when the program has no example inputs
    if detect_format(data[:8]) != "zip":
        raise UnsafeArchive(
            f"{what} is not a torch.save zip (raw pickles are refused: torch.export.load would "
            "unpickle it with weights_only=False)."
        )
    inner, _, inner_members = _open_zip(io.BytesIO(data), len(data), limits, what)
    with inner:
        _check_whitelist(inner_members, _TORCH_SAVE_MEMBERS, what)
        pkl_info = inner_members.get("data.pkl")
        if pkl_info is None:
            raise UnsafeArchive(f"{what} has no data.pkl; it is not a torch.save file.")
        _scan_pickle(_read_member(inner, pkl_info, limits.max_json_bytes, what), what)

    import torch  # lazily: importing core.archive must stay cheap

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


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _describe(
    prefix: str,
    model: Mapping[str, Any],
    weights: Mapping[str, _Payload],
    constants: Mapping[str, _Payload],
) -> ArchiveInfo:
    version = _obj(_key(model, "schema_version", _MODEL_JSON), f"{_M}schema_version")
    major = _int(_key(version, "major", f"{_M}schema_version"), f"{_M}schema_version.major")
    minor = _int(_key(version, "minor", f"{_M}schema_version"), f"{_M}schema_version.minor")
    if major != _SUPPORTED_SCHEMA_MAJOR:
        raise UnsupportedFormat(
            f"The program was saved with export schema {major}.{minor}; this Shears reads "
            f"schema {_SUPPORTED_SCHEMA_MAJOR}.x (torch 2.13). Re-export it with a matching "
            "torch version."
        )
    torch_version = _str(_key(model, "torch_version", _MODEL_JSON), f"{_M}torch_version")
    gm = _obj(_key(model, "graph_module", _MODEL_JSON), f"{_M}graph_module")
    graph = _obj(_key(gm, "graph", f"{_M}graph_module"), f"{_M}graph_module.graph")
    signature = _obj(_key(gm, "signature", f"{_M}graph_module"), f"{_M}graph_module.signature")
    specs = _list(_key(signature, "input_specs", f"{_M}signature"), f"{_M}signature.input_specs")
    tensor_values = _obj(_key(graph, "tensor_values", f"{_M}graph"), f"{_M}graph.tensor_values")
    ranges = _obj(model.get("range_constraints", {}), f"{_M}range_constraints")

    param_by_placeholder: dict[str, str] = {}
    user_level: list[tuple[str, Mapping[str, Any] | None]] = []
    for i, raw_spec in enumerate(specs):
        at = f"{_M}signature.input_specs[{i}]"
        spec = _obj(raw_spec, at)
        if len(spec) != 1:
            raise InvalidArchive(f"{at} must have exactly one kind.")
        kind, body_raw = next(iter(spec.items()))
        body = _obj(body_raw, at)
        if kind == "parameter":
            placeholder = _str(_key(_obj(_key(body, "arg", at), at), "name", at), at)
            target = _str(_key(body, "parameter_name", at), at)
            entry = weights.get(target)
            if entry is None or not entry.is_param:
                raise InvalidArchive(f"Parameter {target!r} has no weight in {_WEIGHTS_CONFIG}.")
            param_by_placeholder[placeholder] = target
        elif kind == "buffer":
            target = _str(_key(body, "buffer_name", at), at)
            persistent = body.get("persistent", True)
            store, store_name = (
                (weights, _WEIGHTS_CONFIG) if persistent else (constants, _CONSTANTS_CONFIG)
            )
            if target not in store:
                raise InvalidArchive(f"Buffer {target!r} has no tensor in {store_name}.")
        elif kind == "tensor_constant":
            target = _str(_key(body, "tensor_constant_name", at), at)
            if target not in constants:
                raise InvalidArchive(f"Constant {target!r} has no tensor in {_CONSTANTS_CONFIG}.")
        elif kind == "custom_obj":
            raise UnsafeArchive(
                "The program takes a custom (torchbind) object, which only loads by "
                "unpickling; Shears does not accept it."
            )
        elif kind == "user_input":
            user_level.append(("user", _obj(_key(body, "arg", at), at)))
        elif kind == "constant_input":
            user_level.append((_str(_key(body, "name", at), at), None))
        elif kind != "token":
            raise InvalidArchive(f"{at} has unknown kind {kind!r}.")

    arg_names = _forward_arg_names(gm)
    use_arg_names = arg_names is not None and len(arg_names) == len(user_level)
    inputs: list[ProgramInput] = []
    for i, (_, arg) in enumerate(user_level):
        if arg is None:
            continue  # a Python constant baked into the program
        tensor_arg = arg.get("as_tensor")
        if not isinstance(tensor_arg, dict):
            raise UnsupportedFormat(
                f"Program input {i} is not a tensor ({sorted(arg)}); Shears supports programs "
                "whose inputs are tensors."
            )
        placeholder = _str(_key(tensor_arg, "name", f"{_M}user input"), f"{_M}user input name")
        name = arg_names[i] if use_arg_names and arg_names is not None else placeholder
        meta = _obj(_key(tensor_values, placeholder, f"{_M}graph.tensor_values"), placeholder)
        inputs.append(_describe_input(name, placeholder, meta, ranges))

    seen: set[str] = set()
    layers: list[PrunableLayer] = []
    for i, raw_node in enumerate(_list(_key(graph, "nodes", f"{_M}graph"), f"{_M}graph.nodes")):
        at = f"{_M}graph.nodes[{i}]"
        node = _obj(raw_node, at)
        op = node.get("target")
        if not isinstance(op, str) or op not in _LAYER_OPS:
            continue
        node_inputs = {
            _str(_key(_obj(item, f"{at}.inputs"), "name", f"{at}.inputs"), f"{at}.inputs"): item
            for item in _list(_key(node, "inputs", at), f"{at}.inputs")
        }
        weight_arg = _obj(node_inputs.get("weight", {}), f"{at}.inputs").get("arg")
        if not isinstance(weight_arg, dict) or not isinstance(weight_arg.get("as_tensor"), dict):
            continue
        weight_name = weight_arg["as_tensor"].get("name")
        parameter = param_by_placeholder.get(weight_name) if isinstance(weight_name, str) else None
        if parameter is None or parameter in seen:
            continue
        if parameter != "weight" and not parameter.endswith(".weight"):
            continue
        payload = weights[parameter]
        layer_kind = _LAYER_OPS[op] or _convolution_kind(node_inputs, len(payload.sizes))
        if layer_kind is None:
            continue
        if len(payload.sizes) != _WEIGHT_RANK[layer_kind]:
            raise InvalidArchive(
                f"{parameter!r} is used by a {layer_kind} but has shape {list(payload.sizes)}."
            )
        seen.add(parameter)
        layers.append(
            PrunableLayer(
                name=parameter.removesuffix("weight").removesuffix("."),
                kind=layer_kind,
                shape=payload.sizes,
                params=payload.numel,
            )
        )

    # Tied parameters appear once per name in the config but share one storage view: count
    # them once, like sum(p.numel() for p in model.parameters()).
    distinct = {
        (p.path_name, p.dtype, p.sizes, p.strides, p.storage_offset)
        for p in weights.values()
        if p.is_param
    }
    num_parameters = sum(math.prod(sizes) for _, _, sizes, _, _ in distinct)

    return ArchiveInfo(
        format="pt2",
        prefix=prefix,
        num_parameters=num_parameters,
        inputs=tuple(inputs),
        prunable_layers=tuple(layers),
        torch_version=torch_version,
        schema_version=f"{major}.{minor}",
    )


def _forward_arg_names(gm: Mapping[str, Any]) -> list[str] | None:
    graph = gm.get("module_call_graph")
    if not isinstance(graph, list):
        return None
    for entry in graph:
        if isinstance(entry, dict) and entry.get("fqn") == "":
            signature = entry.get("signature")
            if isinstance(signature, dict):
                names = signature.get("forward_arg_names")
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    return list(names)
    return None


def _describe_input(
    name: str, placeholder: str, meta: Mapping[str, Any], ranges: Mapping[str, Any]
) -> ProgramInput:
    at = f"{_M}graph.tensor_values[{placeholder!r}]"
    dtype_code = _int(_key(meta, "dtype", at), f"{at}.dtype")
    if dtype_code not in _DTYPES:
        raise InvalidArchive(f"{at} has unknown dtype code {dtype_code}.")
    shape: list[int] = []
    dynamic: list[DynamicDim] = []
    for dim, raw_size in enumerate(_list(_key(meta, "sizes", at), f"{at}.sizes")):
        where = f"{at}.sizes[{dim}]"
        size = _obj(raw_size, where)
        if "as_int" in size:
            shape.append(_int(size["as_int"], where))
            continue
        expr = _obj(_key(size, "as_expr", where), where)
        hint = _obj(_key(expr, "hint", where), f"{where}.hint")
        shape.append(_int(_key(hint, "as_int", f"{where}.hint"), f"{where}.hint"))
        low, high = _range_of(_str(_key(expr, "expr_str", where), where), ranges)
        dynamic.append(DynamicDim(dim=dim, min=low, max=high))
    return ProgramInput(
        name=name, shape=tuple(shape), dtype=_DTYPES[dtype_code][0], dynamic_dims=tuple(dynamic)
    )


def _range_of(expr_str: str, ranges: Mapping[str, Any]) -> tuple[int, int | None]:
    """Find the range torch recorded for a dimension's expression.

    range_constraints is keyed by str(sympy expression) ("s77", "2*s39") while sizes hold
    sympy.srepr; a bare symbol is matched by name, a derived one by rebuilding it with sympy
    from the already-validated syntax tree (no eval). torch treats a missing entry as
    unbounded, so a size gets [0, None].
    """
    key = _str_of_expr(expr_str)
    entry = ranges.get(key) if key is not None else None
    if not isinstance(entry, dict):
        return 0, None
    low = entry.get("min_val")
    high = entry.get("max_val")
    low_int = low if isinstance(low, int) and not isinstance(low, bool) else 0
    high_int = high if isinstance(high, int) and not isinstance(high, bool) else None
    return max(0, low_int), high_int


def _str_of_expr(expr_str: str) -> str | None:
    tree = ast.parse(expr_str, mode="eval").body  # validated by _check_sym_expr already
    if (
        isinstance(tree, ast.Call)
        and isinstance(tree.func, ast.Name)
        and tree.func.id == "Symbol"
        and tree.args
        and isinstance(tree.args[0], ast.Constant)
        and isinstance(tree.args[0].value, str)
    ):
        return tree.args[0].value
    try:
        return str(_build_sympy(tree))
    except Exception:
        return None


def _build_sympy(node: ast.expr) -> Any:
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    def lookup(name: str) -> Any:
        return getattr(torch_sympy, name, None) or getattr(sympy, name)

    def build(n: ast.expr) -> Any:
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            if n.id in _EXPR_FUNCS or n.id in _EXPR_CONSTANTS:
                return lookup(n.id)
            return sympy.Symbol(n.id, integer=True, positive=True)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -build(n.operand)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            func: Callable[..., Any] = lookup(n.func.id)
            kwargs = {k.arg: build(k.value) for k in n.keywords if k.arg is not None}
            return func(*(build(a) for a in n.args), **kwargs)
        raise ValueError("unsupported expression form")

    return build(node)


def _convolution_kind(node_inputs: Mapping[str, Any], rank: int) -> str | None:
    spatial = rank - 2
    if spatial not in (1, 2, 3):
        return None
    transposed_arg = _obj(node_inputs.get("transposed", {}), f"{_M}transposed input").get("arg")
    transposed = isinstance(transposed_arg, dict) and transposed_arg.get("as_bool") is True
    return f"conv_transpose{spatial}d" if transposed else f"conv{spatial}d"


# --------------------------------------------------------------------------------------------
# Small typed JSON accessors: every malformed shape becomes InvalidArchive, never a KeyError
# --------------------------------------------------------------------------------------------


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArchive(f"{where} must be a JSON object.")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArchive(f"{where} must be a JSON list.")
    return value


def _key(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise InvalidArchive(f"{where} has no {key!r}.")
    return obj[key]


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArchive(f"{where} must be an integer.")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArchive(f"{where} must be a string.")
    return value


def _looks_like_text_pickle(head: bytes) -> bool:
    """Heuristic for protocol 0/1 pickles from their first opcode and what follows it.

    It only picks the wording of the refusal; a miss still ends in UnsupportedFormat.
    """
    first, rest = chr(head[0]), head[1:]
    if first in "(])}N":  # MARK, EMPTY_LIST, EMPTY_TUPLE, EMPTY_DICT, NONE: an opcode follows
        return not rest or rest[:1].decode("latin-1") in _PICKLE_OPCODES
    if first == "c":  # GLOBAL "module\nname\n"
        return re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_.]*(?:\n[A-Za-z0-9_.]*)?", rest) is not None
    if first in "ILF":  # INT/LONG/FLOAT "123\n"
        return re.match(rb"-?[0-9]", rest) is not None
    if first == "S":  # STRING "'text'\n"
        return rest[:1] in (b"'", b'"')
    # UNICODE "text\n": a text file starting with "V" would need a short first line.
    return b"\n" in rest
