"""Test-only factories (crafted archives, pickle payloads); the models and datasets themselves
live in ``examples.models``, which the benchmarks share."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from examples.models import (
    DIGITS_PRUNABLE,
    PRUNABLE,
    Block,
    Digits,
    DigitsCNN,
    ResidualCNN,
    accuracy,
    digits_arrays,
    export_digits,
    export_resnet,
    make_digits,
    resnet_module,
    save_npz,
    train_digits_cnn,
)

__all__ = [
    "DIGITS_PRUNABLE",
    "PRUNABLE",
    "Block",
    "Canary",
    "Digits",
    "DigitsCNN",
    "ResidualCNN",
    "accuracy",
    "digits_arrays",
    "export_digits",
    "export_resnet",
    "make_digits",
    "malicious_pickle",
    "replace_member",
    "resnet_module",
    "save_npz",
    "train_digits_cnn",
]


class Canary:
    """A pickle payload that creates ``path`` when unpickled (what an attacker would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def replace_member(archive: Path, out: Path, suffix: str, payload: bytes) -> Path:
    """Copy ``archive`` to ``out`` with the member ending in ``suffix`` replaced by ``payload``."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith(suffix) else src.read(info.filename)
            dst.writestr(info, data)
    return out


def malicious_pickle(canary: Path) -> bytes:
    import pickle

    buffer = io.BytesIO()
    pickle.dump(Canary(canary), buffer)
    return buffer.getvalue()
