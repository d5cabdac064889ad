"""What zeroed weights buy on the worker's device, measured rather than promised.

Unstructured and n:m sparsity make a model smaller to store (a bitmask plus the surviving
values); whether they make it faster depends on a sparse kernel that beats the dense one on the
device. On CPUs torch has only general sparse (CSR) matmul, and vLLM and llm-compressor dropped
their 2:4 paths in 2026, so the honest answer is usually "smaller to store, not faster to run".
Each job says which, for its own weights and device.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from core.metrics import median_latency_ms

TOKENS = 128  # activations per timed matmul: a prefill chunk, or a batch of samples


@dataclass(frozen=True)
class SparseVerdict:
    """Sizes of the prunable weights dense and in a sparse encoding, and one layer's matmul timed
    dense and with the device's sparse kernel."""

    dense_bytes: int
    sparse_bytes: int  # one bit per position plus the nonzero values
    layer: str  # the largest prunable weight: the one timed
    kernel: str
    dense_ms: float
    sparse_ms: float | None  # None: no sparse kernel for this pattern on this device
    faster: bool
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_ms(fn: Any, device: torch.device, repeats: int) -> float:
    return median_latency_ms(fn, warmup=1, repeats=repeats, device=device)


def _is_2_4(weight: torch.Tensor) -> bool:
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % 4:
        return False
    return bool(((rows.reshape(rows.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def measure_sparse_verdict(
    weights: Mapping[str, torch.Tensor], device: torch.device, repeats: int = 5
) -> SparseVerdict:
    """Sizes over all ``weights`` (name -> prunable weight), timings on the largest one."""
    dense_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    sparse_bytes = sum(
        (w.numel() + 7) // 8 + int(w.count_nonzero()) * w.element_size() for w in weights.values()
    )
    name, weight = max(weights.items(), key=lambda item: item[1].numel())
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1).to(device)
        x = torch.randn(TOKENS, w.shape[1], device=device, dtype=w.dtype)
        dense_ms = _median_ms(lambda: x @ w.T, device, repeats)
        kernel, sparse_ms = _sparse_timing(w, x, device, repeats)
    faster = sparse_ms is not None and sparse_ms < dense_ms
    share = sparse_bytes / max(dense_bytes, 1)
    run = "faster" if faster else "not faster"
    timing = (
        f"{kernel} matmul {sparse_ms:.3f} ms vs dense {dense_ms:.3f} ms"
        if sparse_ms is not None
        else f"no {kernel} kernel here (dense {dense_ms:.3f} ms)"
    )
    verdict = (
        f"{'smaller' if share < 1 else 'not smaller'} to store ({share:.0%} of the dense weights "
        f"as bitmask + values), {run} to run on {device}: {timing} on {name}'s shape"
    )
    return SparseVerdict(
        dense_bytes, sparse_bytes, name, kernel, dense_ms, sparse_ms, faster, verdict
    )


def _sparse_timing(
    w: torch.Tensor, x: torch.Tensor, device: torch.device, repeats: int
) -> tuple[str, float | None]:
    if device.type == "cuda" and _is_2_4(w) and w.dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.sparse import to_sparse_semi_structured

            packed = to_sparse_semi_structured(w)
            return "semi-structured 2:4", _median_ms(lambda: packed @ x.T, device, repeats)
        except (RuntimeError, ValueError):  # an unsupported GPU or shape: say so, don't guess
            return "semi-structured 2:4", None
    if device.type == "cpu":
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
        xt = x.T.contiguous()
        return "CSR", _median_ms(lambda: torch.sparse.mm(csr, xt), device, repeats)
    return "sparse", None
