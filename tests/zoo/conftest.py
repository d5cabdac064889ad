"""The zoo tier: each transformers architecture exported once per test module, and saved as the
service receives it (a ``.pt2`` that passes the format gate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from examples.zoo import ZOO, export_zoo

Exported = Callable[[str], tuple[torch.export.ExportedProgram, Path]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """``name -> (program, path of its .pt2)``, built on first use and kept for the module."""
    cache: dict[str, tuple[torch.export.ExportedProgram, Path]] = {}
    folder = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> tuple[torch.export.ExportedProgram, Path]:
        if name not in cache:
            program = export_zoo(ZOO[name])
            path = folder / f"{name}.pt2"
            torch.export.save(program, str(path))
            cache[name] = (program, path)
        return cache[name]

    return get
