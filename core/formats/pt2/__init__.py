"""``torch.export`` programs (``.pt2``): the first model format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.formats import register
from core.formats.base import MeasureConfig, Measurement, ModelInfo, PathLike

if TYPE_CHECKING:
    import torch


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

    def save(self, model: Any, out_dir: Path) -> dict[str, Path]:
        from core.program import save_program, save_weights

        model_file, weights_file = out_dir / f"model{self.suffix}", out_dir / "weights.safetensors"
        save_program(model, model_file)
        save_weights(model.state_dict, weights_file)
        return {"model": model_file, "weights": weights_file}

    def count_parameters(self, model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    def measure(self, model: Any, info: ModelInfo, config: MeasureConfig) -> Measurement:
        from core.program import measure_program

        return measure_program(model, info, config)


PT2 = register(Pt2Format())
