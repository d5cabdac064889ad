"""Loading, running and saving ``torch.export`` programs, always behind the validating gate."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.device import pick_device
from core.errors import ModelLoadError
from core.formats.base import MeasureConfig, Measurement, ModelInfo, ProgramInput
from core.formats.pt2.describe import Pt2Info
from core.formats.pt2.gate import inspect_archive
from core.metrics import count_macs, median_latency_ms

__all__ = [
    "batch_size_for",
    "load_program",
    "measure_program",
    "module_on",
    "save_program",
    "synthetic_inputs",
]


def load_program(path: str | os.PathLike[str]) -> tuple[torch.export.ExportedProgram, Pt2Info]:
    """Gate the archive at ``path``, then load it.

    ``torch.export.load`` may unpickle members with ``weights_only=False``; it only ever sees an
    archive that :func:`core.formats.pt2.gate.inspect_archive` has passed on the same bytes.

    Raises:
        UnsupportedFormat, InvalidArchive, UnsafeArchive: the gate refused the file.
        ModelLoadError: the gated archive still did not load.
    """
    info = inspect_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"the program passed validation but did not load: {exc}") from exc
    return program, info


def save_weights(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state`` as ``.safetensors`` under its own names (the original parameter names)."""
    # safetensors refuses tensors that share storage (tied weights): give each its own copy then.
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    save_file(tensors, str(path), metadata={"format": "pt", "producer": "shears"})


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> None:
    """Write ``program`` as a ``.pt2`` archive."""
    torch.export.save(program, str(Path(path)))


def module_on(
    program: torch.export.ExportedProgram,
    device: torch.device | str = "cpu",
    state: Mapping[str, torch.Tensor] | None = None,
) -> torch.fx.GraphModule:
    """``program.module()`` holding its own copies of the parameters and buffers on ``device``
    (taken from ``state`` where it names them).

    Why: the module ``program.module()`` returns shares its ``nn.Parameter`` objects with
    ``program.state_dict``, and ``module.to(device)`` swaps their data in place -- it would move
    the program's own weights (measured: ``.to(torch.float64)`` changed the program's dtype).
    """
    module = program.module()
    copies: dict[int, torch.Tensor] = {}

    def copy(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:  # tied tensors stay tied
            source = state[name] if state is not None and name in state else tensor
            copies[id(tensor)] = source.detach().to(device, copy=True)
        return copies[id(tensor)]

    for name, param in list(module.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        new = copy(name, param)
        if not isinstance(new, torch.nn.Parameter):
            new = copies[id(param)] = torch.nn.Parameter(new, requires_grad=param.requires_grad)
        setattr(module.get_submodule(owner), attr, new)
    for name, buffer in list(module.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        module.get_submodule(owner)._buffers[attr] = copy(name, buffer)
    return module


_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"}


def batch_size_for(inputs: tuple[ProgramInput, ...], wanted: int) -> int:
    """The batch size at which the program can run closest to ``wanted``.

    A dynamic first dimension is clamped to its exported range; a static one is what it is.
    """
    if not inputs or not inputs[0].shape:
        return 1
    first = inputs[0]
    dim0 = next((d for d in first.dynamic_dims if d.dim == 0), None)
    if dim0 is None:
        return first.shape[0]
    upper = dim0.max if dim0.max is not None else wanted
    return max(dim0.min, 1, min(wanted, upper))


def synthetic_inputs(
    inputs: tuple[ProgramInput, ...], batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Inputs the program accepts, at ``batch_size`` where the first dimension is dynamic.

    Floating inputs are standard normal, integer and boolean ones zero (always a valid index).
    Only shapes and dtypes come from the upload's metadata: nothing is unpickled.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in inputs:
        shape = list(spec.shape)
        if any(d.dim == 0 for d in spec.dynamic_dims):
            shape[0] = batch_size
        dtype = getattr(torch, spec.dtype)
        if spec.dtype in _INT_DTYPES:
            tensors.append(torch.zeros(shape, dtype=dtype))
        else:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
    return tuple(tensors)


def measure_program(
    program: torch.export.ExportedProgram, info: ModelInfo, config: MeasureConfig
) -> Measurement:
    """MACs per sample and the median latency of one batch, run on ``config.device``.

    The program's own weights stay where they are: the measured module holds copies.
    """
    device = pick_device(config.device)
    batch = batch_size_for(info.inputs, config.batch_size)
    module = module_on(program, device)
    inputs = tuple(t.to(device) for t in synthetic_inputs(info.inputs, batch))

    def call() -> object:
        return module(*inputs)

    macs = count_macs(call, batch)
    latency = median_latency_ms(call, config.warmup, config.repeats, device)
    return Measurement(macs=macs, latency_ms=latency, batch_size=batch, device=str(device))
