"""How freed memory goes back to the OS: the allocator setting a worker may apply (large freed
blocks at once), and the release SparseGPT asks for between its phases."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from core.allocator import set_mmap_threshold

_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from core.allocator import release_free_memory, set_mmap_threshold

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if sys.argv[1] == "set":
        assert set_mmap_threshold(1 << 20)
    big = torch.ones(24 << 18)  # 24 MiB, freed: glibc's own threshold rises above 6 MiB
    del big
    chunks = [torch.ones(6 << 18) for _ in range(16)]  # 96 MiB of 6 MiB blocks, touched
    pinned = [torch.ones(256) for _ in range(64)]  # small blocks allocated after them
    before = rss()
    del chunks
    if sys.argv[1] == "release":
        assert release_free_memory()
    print(before - rss())
    """
)


def _returned_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_a_fixed_threshold_returns_freed_blocks_at_once() -> None:
    returned = _returned_mib("set")
    assert returned >= 0.9 * 96, returned
    print(f"returned {returned:.0f} MiB with the threshold, {_returned_mib('default'):.0f} without")


def test_the_release_returns_what_the_heap_kept() -> None:
    kept = _returned_mib("default")
    returned = _returned_mib("release")
    assert returned >= 0.9 * 96, (returned, kept)
    assert kept < 0.5 * 96, kept  # else this test shows nothing about the release


def test_zero_leaves_the_allocators_own_policy() -> None:
    assert set_mmap_threshold(0) is False
    assert set_mmap_threshold(-1) is False
