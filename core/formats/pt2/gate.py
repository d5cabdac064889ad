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

The checks, in the order :func:`inspect_archive` runs them, one module each:
:mod:`~core.formats.pt2.sniff` (what the first bytes are), :mod:`~core.formats.pt2.container`
(the zip: end records, names, entries, local headers; then the member whitelist below),
:mod:`~core.formats.pt2.payload` (the weights and constants configs),
:mod:`~core.formats.pt2.sandbox` with :mod:`~core.formats.pt2.expressions` (every string torch
would ``eval``/``exec``/``getattr``), :mod:`~core.formats.pt2.pickles` (the sample inputs), and
:mod:`~core.formats.pt2.describe` (the metadata). Importing the gate does not import torch.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from collections.abc import Mapping
from typing import Final

from core.errors import InvalidArchive, UnsupportedFormat
from core.formats.pt2.constants import (
    CONSTANTS_CONFIG,
    EXPORT_HINT,
    INDEX,
    MODEL_JSON,
    SAMPLE_INPUTS,
    WEIGHTS_CONFIG,
    ArchiveLimits,
)
from core.formats.pt2.container import (
    check_limits,
    check_whitelist,
    classify_zip,
    open_zip,
    read_json,
    read_member,
    require_member,
)
from core.formats.pt2.describe import Pt2Info, describe
from core.formats.pt2.payload import check_payload_config
from core.formats.pt2.pickles import check_sample_inputs
from core.formats.pt2.sandbox import check_model_code
from core.formats.pt2.sniff import claims_pt2, detect_format

__all__ = ["ArchiveLimits", "Pt2Info", "claims_pt2", "detect_format", "inspect_archive"]


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
        rf"data/weights/weight_{INDEX}",
        r"data/constants/model_constants_config\.json",
        rf"data/constants/tensor_{INDEX}",
        r"data/sample_inputs/model\.pt",
    )
)


_DEFAULT_LIMITS: Final = ArchiveLimits()


def inspect_archive(
    path: str | os.PathLike[str], limits: ArchiveLimits = _DEFAULT_LIMITS
) -> Pt2Info:
    """Gate an uploaded file and describe the ``torch.export`` program it holds.

    Raises :class:`UnsupportedFormat` for anything that is not a ``.pt2`` (pickles, TorchScript,
    ``torch.save`` checkpoints, other zips, unknown bytes), :class:`UnsafeArchive` for anything
    that could run code, escape its folder or exhaust resources when loaded, and
    :class:`InvalidArchive` for malformed or inconsistent archives. Returns only when the file
    is safe to hand to ``torch.export.load``. Nothing is written to disk and no weight is read.
    ``OSError`` from opening ``path`` propagates (that is the caller's file, not the upload).
    """
    check_limits(limits)
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
                + EXPORT_HINT
            )
        if kind != "zip":
            raise UnsupportedFormat(
                "The upload is not a torch.export program (unrecognised content). " + EXPORT_HINT
            )
        fh.seek(0)
        zf, prefix, members = open_zip(fh, size, limits, "The upload")
        with zf:
            classify_zip(zf, prefix, members)
            check_whitelist(members, _PT2_MEMBERS, "The archive")
            return _inspect_pt2(zf, prefix, members, limits)


def _inspect_pt2(
    zf: zipfile.ZipFile,
    prefix: str,
    members: Mapping[str, zipfile.ZipInfo],
    limits: ArchiveLimits,
) -> Pt2Info:
    fmt = read_member(zf, members["archive_format"], 64, "archive_format")
    if fmt != b"pt2":
        raise UnsupportedFormat(
            f"The upload is a zip archive with archive_format {fmt[:16]!r}, not a torch.export "
            "program. " + EXPORT_HINT
        )
    version = read_member(zf, require_member(members, "archive_version"), 64, "archive_version")
    if version != b"0":
        raise InvalidArchive(
            f"The archive has archive_version {version[:16]!r}; this Shears reads version 0 "
            "(torch 2.13)."
        )
    if "byteorder" in members:
        order = read_member(zf, members["byteorder"], 64, "byteorder")
        if order != b"little":
            raise InvalidArchive(f"The archive stores tensors in {order[:16]!r} byte order.")

    cap = limits.max_json_bytes
    weights = check_payload_config(read_json(zf, members, WEIGHTS_CONFIG, cap), members, "weights")
    constants = check_payload_config(
        read_json(zf, members, CONSTANTS_CONFIG, cap), members, "constants"
    )
    model = read_json(zf, members, MODEL_JSON, cap)
    check_model_code(model)
    check_sample_inputs(zf, require_member(members, SAMPLE_INPUTS), limits)
    try:
        return describe(prefix, model, weights, constants)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # The explicit checks should make this unreachable; never let a raw error escape.
        raise InvalidArchive(f"{MODEL_JSON} is inconsistent ({exc!r}).") from exc
