"""How freed memory goes back to the operating system while a model is pruned.

glibc serves allocations below its mmap threshold from the heap and keeps them there when they
are freed; the threshold also rises to the size of each mapped block freed, up to 32 MiB. A
calibration forward frees tens of MiB of 4-16 MiB temporaries (per-sample activations, the copies
the hooks take), which then stay in the process's resident memory beside the next phase's
allocations: SparseGPT at the 1 B widths held 310 MiB over the model where 262 MiB were live.
A fixed threshold maps every block of that size or more, so freeing it returns it at once: at 4
MiB SparseGPT at those widths peaked 40-50 MiB lower for 3% more time, but a CPU training step
with 16 MiB activations took 30% longer (each mapped block's pages are faulted in and zeroed
again). So it is a worker setting for memory-bound pruning, off by default (docs/benchmarks.md).
What SparseGPT does instead, between its forwards and its sweeps, is give the heap's free pages
back once (:func:`release_free_memory`): at those widths its peak fell from 319 to 266 MiB
(medians of 3, with the error report's buffer reused) at no measurable cost in time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# The value measured: blocks of 4 MiB and more are mapped (the calibration temporaries), not the
# small tensors of per-op bookkeeping (mapping those costs more time than it saves memory).
DEFAULT_MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def set_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Map every allocation of at least ``nbytes`` (glibc's ``M_MMAP_THRESHOLD``), for this
    process and the processes it forks later. Returns whether the allocator took it: False on a
    C library without ``mallopt`` (musl, macOS) or for ``nbytes`` ≤ 0, which leaves the
    allocator's own policy."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def release_free_memory() -> bool:
    """Give the free pages inside the heap back to the operating system (glibc's
    ``malloc_trim(0)``), without changing the allocator's policy: what a calibration forward
    freed then no longer counts in the resident memory of the phase after it. Returns whether
    any memory was released (False where there is no ``malloc_trim``)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))
