"""The upload gate as a whole (core.formats.pt2.gate): what it refuses, that it never loads,
and that each code-execution vector it stops is real in torch.export.load.

The vectors are shown to be real by letting torch.export.load run them in a subprocess (so this
process never runs the payload).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.errors import UnsafeArchive, UnsupportedFormat
from core.formats.pt2.gate import Pt2Info, inspect_archive
from tests.core.formats.pt2_archives import (
    MODEL_JSON,
    SAMPLE_INPUTS,
    Canary,
    edit_json,
    rewrite,
    torch_save_bytes,
)

ROOT = Path(__file__).resolve().parents[3]


def test_gated_archive_loads_and_runs(archives: dict[str, Path]) -> None:
    inspect_archive(archives["resnet"])
    program = torch.export.load(str(archives["resnet"]))
    assert program.module()(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_inspect_never_calls_torch_export_load(
    archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the gate must not call torch.export.load")

    monkeypatch.setattr(torch.export, "load", forbidden)
    assert isinstance(inspect_archive(archives["resnet"]), Pt2Info)


def test_importing_the_gate_does_not_import_torch() -> None:
    code = (
        "import sys, core.formats.pt2.gate\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


LOAD_ALL = """
import sys, torch
for path in sys.argv[1:]:
    try:
        torch.export.load(path).module()(torch.randn(4, 3, 8, 8))
    except BaseException:
        pass
"""


def test_code_execution_vectors_are_refused_and_real(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    resnet = archives["resnet"]
    canaries = {name: tmp_path / f"{name}.canary" for name in ("pickle", "sympy", "guards")}

    # 1. sample inputs replaced by a pickle whose __reduce__ opens (creates) a file.
    evil_pickle = rewrite(
        resnet,
        tmp_path / "pickle.pt2",
        replace={SAMPLE_INPUTS: torch_save_bytes(Canary(canaries["pickle"]))},
    )

    # 2. a symbolic size: torch.export.load hands expr_str to sympy.sympify, which eval()s it.
    def sympy_payload(doc: dict[str, Any]) -> None:
        size = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"__import__('os').system('touch {canaries['sympy']}')"

    evil_sympy = edit_json(resnet, tmp_path / "sympy.pt2", MODEL_JSON, sympy_payload)

    # 3. a guard: ExportedProgram.module() exec()s guards_code; it runs on the first call.
    def guard_payload(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [f"__import__('os').system('touch {canaries['guards']}') == 0"]

    evil_guard = edit_json(resnet, tmp_path / "guards.pt2", MODEL_JSON, guard_payload)

    for crafted, match in (
        (evil_pickle, "sample_inputs"),
        (evil_sympy, "expr_str"),
        (evil_guard, "guards_code"),
    ):
        with pytest.raises(UnsafeArchive, match=match):
            inspect_archive(crafted)
    assert not any(c.exists() for c in canaries.values())

    # Prove the payloads are real: torch.export.load (and .module()) runs every one of them.
    # torch 2.13 logs the weights_only=True failure, then retries with weights_only=False.
    subprocess.run(
        [sys.executable, "-c", LOAD_ALL, str(evil_pickle), str(evil_sympy), str(evil_guard)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert {name: c.exists() for name, c in canaries.items()} == {
        "pickle": True,
        "sympy": True,
        "guards": True,
    }


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p, c: torch.save(small(), p, _use_new_zipfile_serialization=False), "pickle"),
        (lambda p, c: p.write_bytes(pickle.dumps(Canary(c))), "pickle"),
        (lambda p, c: p.write_bytes(pickle.dumps(Canary(c), protocol=0)), "pickle"),
        (lambda p, c: torch.save(small(), p), "torch.save"),
        (lambda p, c: torch.save(Canary(c), p), "torch.save"),
        (lambda p, c: torch.jit.script(small()).save(str(p)), "TorchScript"),  # type: ignore[no-untyped-call]
        (lambda p, c: p.write_bytes(os.urandom(4096)), "unrecognised"),
        (lambda p, c: p.write_bytes(b""), "unrecognised"),
        (lambda p, c: zipfile.ZipFile(p, "w").writestr("a/b.txt", "hi"), "archive_format"),
    ],
)
def test_other_formats_are_unsupported(
    tmp_path: Path, make: Callable[[Path, Path], Any], match: str
) -> None:
    upload = tmp_path / "model.pt2"  # the name never matters
    canary = tmp_path / "canary"
    make(upload, canary)
    with pytest.raises(UnsupportedFormat, match=match) as caught:
        inspect_archive(upload)
    assert "torch.export.save" in caught.value.message
    assert not canary.exists()


def test_wrong_archive_format_is_unsupported(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "f.pt2", replace={"archive_format": b"pt3"})
    with pytest.raises(UnsupportedFormat, match="archive_format"):
        inspect_archive(crafted)
