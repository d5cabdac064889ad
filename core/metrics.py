"""What changed: parameters, nonzeros, MACs, bytes and latency of a program."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.device import synchronize


def count_macs(run: Callable[[], object], batch_size: int) -> int:
    """Multiply-accumulates per sample of one call of ``run``, as dense kernels execute them.

    Counted by torch's FlopCounterMode over the ATen ops actually dispatched (matmuls, convolutions,
    attention); a zero weight costs the same as any other. Elementwise ops are not counted.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    flops: int = counter.get_total_flops()
    return round(flops / 2 / batch_size)


def median_latency_ms(
    run: Callable[[], object], warmup: int, repeats: int, device: torch.device | None = None
) -> float:
    """Median wall time of ``run`` in milliseconds, after ``warmup`` untimed calls; on an
    asynchronous device (CUDA) each timing waits for the device to finish."""
    dev = device or torch.device("cpu")
    with torch.no_grad():
        for _ in range(warmup):
            run()
        synchronize(dev)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            synchronize(dev)
            timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def sparse_size_bytes(tensors: Mapping[str, torch.Tensor], sparse: Iterable[str]) -> int:
    """Bytes of ``tensors`` with those named in ``sparse`` stored as a bitmask plus their nonzeros.

    The others are counted dense. This is the size a sparse-aware format (one bit per position and
    the surviving values) would need, whatever the ``.pt2`` itself stores.
    """
    sparse_names = set(sparse)
    total = 0
    for name, tensor in tensors.items():
        if name in sparse_names:
            total += (tensor.numel() + 7) // 8 + int(tensor.count_nonzero()) * tensor.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def distinct_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with tied ones (the same view of the same storage, as GPT-2's ``wte`` and
    ``lm_head``, which a program lists under both names) kept once."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for tensor in tensors:
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key not in seen or tensor.numel() == 0:
            seen.add(key)
            out.append(tensor)
    return out


def distinct_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Elements of ``tensors``, tied ones counted once."""
    return sum(t.numel() for t in distinct_tensors(tensors))
