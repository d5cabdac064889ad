"""``torch.export`` programs (``.pt2``): the first model format.

The package, one concern a module: :mod:`.gate` (the upload gate, composing :mod:`.sniff`,
:mod:`.container`, :mod:`.payload`, :mod:`.sandbox`, :mod:`.expressions`, :mod:`.pickles` and
:mod:`.describe`) and :mod:`.program` (load, save, run, measure).

The gate and this module never import torch: the registry (:mod:`core.formats`) registers
:data:`PT2` on import, and the API gates uploads through it without paying for torch. The
torch-bound half (:mod:`.program`) is imported when a program is loaded, saved or measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.formats import register
from core.formats.base import MeasureConfig, Measurement, ModelInfo, PathLike
from core.formats.pt2.constants import ArchiveLimits
from core.formats.pt2.describe import Pt2Info
from core.formats.pt2.gate import claims_pt2, inspect_archive

if TYPE_CHECKING:
    import torch

__all__ = ["PT2", "ArchiveLimits", "Pt2Format", "Pt2Info", "inspect_archive"]


class Pt2Format:
    """``torch.export`` programs, behind the validating gate of :mod:`core.formats.pt2.gate`."""

    name: ClassVar[str] = "pt2"
    suffix: ClassVar[str] = ".pt2"

    def claims(self, path: PathLike) -> bool:
        return claims_pt2(path)

    def inspect(self, path: PathLike) -> Pt2Info:
        return inspect_archive(path)

    def load(self, path: PathLike) -> tuple[torch.export.ExportedProgram, ModelInfo]:
        from core.formats.pt2 import program  # torch: see the module docstring

        return program.load_program(path)

    def save(self, model: Any, out_dir: Path) -> dict[str, Path]:
        from core.formats.pt2 import program

        model_file, weights_file = out_dir / f"model{self.suffix}", out_dir / "weights.safetensors"
        program.save_program(model, model_file)
        program.save_weights(model.state_dict, weights_file)
        return {"model": model_file, "weights": weights_file}

    def layer_weights(self, model: Any, info: ModelInfo) -> dict[str, Any]:
        state = model.state_dict
        return {layer.name: state[f"{layer.name}.weight"] for layer in info.prunable_layers}

    def count_parameters(self, model: Any) -> int:
        from core.metrics import distinct_numel

        return distinct_numel(model.parameters())  # a tied weight is listed under each name

    def measure(self, model: Any, info: ModelInfo, config: MeasureConfig) -> Measurement:
        from core.formats.pt2 import program

        return program.measure_program(model, info, config)


PT2 = register(Pt2Format())
