"""Hugging Face checkpoints (``hf``): a ``save_pretrained`` folder in a tar or zip archive.

Safetensors weights and a ``tokenizers`` tokenizer, for causal LMs that transformers ships;
remote code is never run, nothing is fetched from the Hub. The pieces:

* :mod:`~core.formats.hf.container` -- the archive: listing, path/link/size checks, copying.
* :mod:`~core.formats.hf.safetensors_header` -- one safetensors header, checked against its file.
* :mod:`~core.formats.hf.gate` -- the member allow-list, JSON rules, the :class:`HfInfo`.
* :mod:`~core.formats.hf.model` -- :class:`HfModel`, load, save, parameter count.
* :mod:`~core.formats.hf.measure` -- MACs per token, prefill latency, decode throughput.

Example::

    from core.formats import get_format

    hf = get_format("hf")
    info = hf.inspect("tiny-llama.tar.gz")      # HfInfo: architecture, config, prunable layers
    model, info = hf.load("tiny-llama.tar.gz")   # HfModel; close() deletes its temporary folder
    with model:
        hf.save(model, out_dir)                  # {"model": out_dir / "model.tar"}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from core.formats import register
from core.formats.base import MeasureConfig, Measurement, ModelInfo, PathLike
from core.formats.hf.gate import HfConfig, HfInfo
from core.formats.hf.model import HfModel


class HfFormat:
    """Hugging Face causal-LM checkpoints behind the gate of :mod:`core.formats.hf.gate`.

    :meth:`load` returns an :class:`HfModel`; the caller closes it when done with the model.
    """

    name: ClassVar[str] = "hf"
    suffix: ClassVar[str] = ".tar"

    def claims(self, path: PathLike) -> bool:
        from core.formats.hf.gate import claims

        return claims(path)

    def inspect(self, path: PathLike) -> HfInfo:
        from core.formats.hf.gate import inspect

        return inspect(path)

    def load(self, path: PathLike) -> tuple[HfModel, HfInfo]:
        from core.formats.hf.model import load

        return load(path)

    def save(self, model: Any, out_dir: Path) -> dict[str, Path]:
        from core.formats.hf.model import save

        return save(model, out_dir)

    def layer_weights(self, model: Any, info: ModelInfo) -> dict[str, Any]:
        inner = model.model
        return {
            layer.name: inner.get_submodule(layer.name).weight for layer in info.prunable_layers
        }

    def count_parameters(self, model: Any) -> int:
        from core.formats.hf.model import count_parameters

        return count_parameters(model)

    def measure(self, model: Any, info: ModelInfo, config: MeasureConfig) -> Measurement:
        from core.formats.hf.measure import measure

        if not isinstance(info, HfInfo):
            raise TypeError(f"hf measures an HfInfo, got {type(info).__name__}")
        if isinstance(model, HfModel):
            return measure(model.model, info, config, model.eos_token_id)
        return measure(model, info, config)


HF = register(HfFormat())

__all__ = ["HF", "HfConfig", "HfFormat", "HfInfo", "HfModel"]
