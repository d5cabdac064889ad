"""Which device a step runs on: one resolver, so training, evaluation and measurement agree."""

from __future__ import annotations

import torch

from core.errors import DeviceUnavailable


def pick_device(requested: str | None = None) -> torch.device:
    """``requested``, or CUDA when this process has it, else the CPU.

    CUDA is touched only here, never at import, so forked workers initialise it themselves.

    Raises:
        DeviceUnavailable: ``requested`` is not a device string, or names a device this process
            does not have (``cuda:1`` on a one-GPU machine, ``cuda`` without CUDA).
    """
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as exc:
        raise DeviceUnavailable(f"{requested!r} is not a torch device string: {exc}") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceUnavailable(
                f"device {requested!r} is not available on this worker ({count} CUDA device(s))"
            )
    elif device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise DeviceUnavailable(f"device {requested!r} is not available on this worker")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
