"""``torch.export`` programs (``.pt2``): the first model format."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from core.formats import register
from core.formats.base import MeasureConfig, Measurement, ModelInfo, PathLike


class Pt2Format:
    """``torch.export`` programs, behind the validating gate of :mod:`core.archive`."""

    name: ClassVar[str] = "pt2"
    suffix: ClassVar[str] = ".pt2"

    def claims(self, path: PathLike) -> bool:
        from core.archive import claims_pt2

        return claims_pt2(path)

    def inspect(self, path: PathLike) -> ModelInfo:
        from core.archive import inspect_archive

        return inspect_archive(path)

    def load(self, path: PathLike) -> tuple[torch.export.ExportedProgram, ModelInfo]:
        from core.program import load_program

        return load_program(path)

    def save(self, model: Any, path: PathLike) -> Path:
        from core.program import save_program

        save_program(model, path)
        return Path(path)

    def count_parameters(self, model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    def measure(self, model: Any, info: ModelInfo, config: MeasureConfig) -> Measurement:
        from core.program import measure_program

        return measure_program(model, info, config)


PT2 = register(Pt2Format())
