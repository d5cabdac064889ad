"""What every model format offers: recognise an upload, gate and describe it, load, save, measure.

A format is one module under ``core/formats/`` that registers one object satisfying
:class:`ModelFormat` (see :mod:`core.formats`). The API only ever calls :meth:`ModelFormat.claims`
and :meth:`ModelFormat.inspect` (metadata from bytes, no weights loaded); the worker's pipeline
calls :meth:`ModelFormat.load`, :meth:`ModelFormat.save` and :meth:`ModelFormat.measure`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DynamicDim:
    """A dimension of a model input whose size is symbolic (``torch.export.Dim``)."""

    dim: int
    min: int
    max: int | None


@dataclass(frozen=True)
class ProgramInput:
    """A tensor input of the model, as the user calls it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dynamic_dims: tuple[DynamicDim, ...]


@dataclass(frozen=True)
class PrunableLayer:
    """A convolution or linear layer whose weight is a parameter of the model."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    # The weight dim summed over (its input channels): 1 for conv and linear weights, 0 for a
    # matrix product's (in, out) weight such as GPT-2's Conv1D; n:m patterns run along it.
    reduction_dim: int = 1


@dataclass(frozen=True)
class ModelInfo:
    """What a format's gate learnt about an upload, from its metadata only.

    Formats subclass it to add what only they know (the ``.pt2`` schema version, a Hugging Face
    config); the service stores the common fields and ``details()``.
    """

    format: str
    num_parameters: int
    inputs: tuple[ProgramInput, ...]
    prunable_layers: tuple[PrunableLayer, ...]

    def details(self) -> dict[str, Any]:
        """Format-specific metadata worth showing to the user (JSON-serialisable)."""
        return {}


@dataclass(frozen=True)
class Measurement:
    """Cost of one model: MACs per sample (per token for language models), the median latency
    of one batch (a prefill for language models) and, for language models, greedy decoding
    throughput at batch 1 with the KV cache."""

    macs: int
    latency_ms: float
    batch_size: int
    device: str
    tokens_per_second: float | None = None


@dataclass(frozen=True)
class MeasureConfig:
    """How latency is measured: on ``device``, at ``batch_size``, median of ``repeats`` runs."""

    batch_size: int = 32
    warmup: int = 3
    repeats: int = 10
    device: str = "cpu"


@runtime_checkable
class ModelFormat(Protocol):
    """One model format. ``Model`` is whatever :meth:`load` returns (an ``ExportedProgram`` for
    ``pt2``); the pipeline hands it back to the same format's methods and to the pruners
    registered for this format."""

    name: ClassVar[str]  # "pt2": the `format` field of models and artifacts
    suffix: ClassVar[str]  # ".pt2": the file name of the model artifact

    def claims(self, path: PathLike) -> bool:
        """Whether the file at ``path`` looks like this format (cheap: its first bytes or its
        container listing). Deciding is not gating: :meth:`inspect` still checks everything."""
        ...

    def inspect(self, path: PathLike) -> ModelInfo:
        """Gate the upload and describe it without loading a weight.

        Raises:
            UnsupportedFormat, InvalidArchive, UnsafeArchive: the file is refused.
        """
        ...

    def load(self, path: PathLike) -> tuple[Any, ModelInfo]:
        """Gate, then load the model (only ever bytes that :meth:`inspect` passed)."""
        ...

    def save(self, model: Any, out_dir: Path) -> dict[str, Path]:
        """Write ``model`` into ``out_dir``; returns the files written by artifact kind:
        ``model`` (this format, named ``model`` + :attr:`suffix`) and any others the format
        offers (``weights`` for ``pt2``)."""
        ...

    def count_parameters(self, model: Any) -> int:
        """Parameters of ``model`` (tied tensors counted once)."""
        ...

    def measure(self, model: Any, info: ModelInfo, config: MeasureConfig) -> Measurement:
        """MACs and median latency of ``model`` on ``config.device``."""
        ...

    def layer_weights(self, model: Any, info: ModelInfo) -> dict[str, Any]:
        """The weight tensor of each of ``info.prunable_layers`` in ``model``, by layer name."""
        ...
