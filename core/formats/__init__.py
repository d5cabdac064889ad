"""Model formats, by registration: each format is one module that calls :func:`register`.

Example::

    from core.formats import detect, get_format

    fmt = detect("resnet.pt2")          # the format that claims the file (pt2 here)
    info = fmt.inspect("resnet.pt2")    # gated metadata: inputs, prunable layers, parameters
    model, info = fmt.load("resnet.pt2")

Adding a format is one module beside ``pt2/`` plus one line at the bottom of this file.
"""

from __future__ import annotations

from core.formats.base import (
    DynamicDim,
    MeasureConfig,
    Measurement,
    ModelFormat,
    ModelInfo,
    PathLike,
    ProgramInput,
    PrunableLayer,
)

_FORMATS: dict[str, ModelFormat] = {}
# The format whose gate words the refusal of a file that no format claims.
_DEFAULT = "pt2"


def register(fmt: ModelFormat) -> ModelFormat:
    """Make ``fmt`` known by its name; the first registered format is asked first."""
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> ModelFormat:
    """Forget the format called ``name`` and return it (``KeyError`` if there is none)."""
    return _FORMATS.pop(name)


def get_format(name: str) -> ModelFormat:
    """The registered format called ``name`` (``KeyError`` if there is none)."""
    return _FORMATS[name]


def formats() -> tuple[ModelFormat, ...]:
    """Every registered format, in registration order."""
    return tuple(_FORMATS.values())


def detect(path: PathLike) -> ModelFormat:
    """The format that claims the file; where none does, the default format, whose gate then
    refuses it with the most useful message (a pickle, TorchScript, unknown bytes)."""
    for fmt in _FORMATS.values():
        if fmt.claims(path):
            return fmt
    return _FORMATS[_DEFAULT]


def inspect_upload(path: PathLike) -> ModelInfo:
    """Gate and describe an upload of any registered format."""
    return detect(path).inspect(path)


__all__ = [
    "DynamicDim",
    "MeasureConfig",
    "Measurement",
    "ModelFormat",
    "ModelInfo",
    "ProgramInput",
    "PrunableLayer",
    "detect",
    "formats",
    "get_format",
    "inspect_upload",
    "register",
    "unregister",
]

# Registration: one line per format, asked in this order (hf before pt2, which claims any zip).
from core.formats import hf as _hf  # noqa: E402  (registers itself)
from core.formats import pt2 as _pt2  # noqa: E402  (registers itself)

del _hf, _pt2
