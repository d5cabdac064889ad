"""Which GPUs a worker sees, and which one each pool child takes, without touching CUDA.

The worker's main process forks its pool children; CUDA initialised before a fork is unusable in
the child. So the main process counts GPUs through ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi`` (a
separate process), and each child narrows ``CUDA_VISIBLE_DEVICES`` to its own GPU before anything
in it imports CUDA state: one process per GPU.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping

import torch

from shears.settings import Settings

GpuProbe = Callable[[], int]


def nvidia_smi_count() -> int:
    """GPUs the NVIDIA driver lists; 0 where there is no driver (``nvidia-smi`` missing/failing)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def visible_gpus(
    probe: GpuProbe = nvidia_smi_count, env: Mapping[str, str] | None = None
) -> list[str]:
    """The device ids this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    env = os.environ if env is None else env  # noqa: TID251 -- CUDA's variable, not a setting
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(probe())]
    gpus = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break  # CUDA stops at the first invalid entry: "-1" hides every device
        gpus.append(entry)
    return gpus if probe() > 0 else []


def default_queues(settings: Settings, gpus: list[str]) -> list[str]:
    """``SHEARS_QUEUE``, plus ``SHEARS_GPU_QUEUE`` when a GPU is visible."""
    return [settings.queue, settings.gpu_queue] if gpus else [settings.queue]


def gpu_for_child(index: int, gpus: list[str]) -> str:
    """The GPU of pool child ``index`` (children past the GPU count share, round robin)."""
    return gpus[index % len(gpus)]


def pin_child(index: int, gpus: list[str], env: dict[str, str] | None = None) -> str | None:
    """Narrow this child's ``CUDA_VISIBLE_DEVICES`` to its GPU; must run before CUDA is used."""
    if not gpus:
        return None
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        raise RuntimeError("CUDA was initialised before the worker's pool child was pinned")
    gpu = gpu_for_child(index, gpus)
    (os.environ if env is None else env)["CUDA_VISIBLE_DEVICES"] = gpu  # noqa: TID251
    return gpu


def check_device_string(requested: str | None) -> None:
    """Refuse a ``SHEARS_TRAIN_DEVICE`` that is not a torch device string at start-up (parsing
    only: whether the device exists is the child's question, after the fork)."""
    if not requested:
        return
    try:
        torch.device(requested)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"SHEARS_TRAIN_DEVICE={requested!r} is not a torch device: {exc}") from exc
