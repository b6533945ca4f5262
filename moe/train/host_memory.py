"""Host (CPU) memory policy of a training or benchmark process.

glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it to the OS on free. A CPU training step frees and reallocates the same large tensors every
step (weight gradients, activations, the expert-sorted token buffers), so each step page-faults them
in again: about 2 us per 4 KiB page on the dev VM, where it cost the compiled expert op's backward
at T=1024 (d=512, E=8: a 32 MiB grad_w13) 83 ms instead of 72 ms (BENCHMARKS.md).

`keep_freed_memory()` makes freed blocks stay in the process for reuse: the steady state that
PyTorch's CUDA caching allocator gives GPU tensors and that jemalloc/tcmalloc give CPU users who
preload them. The price: the process's resident memory stays at its peak instead of shrinking
between steps. (Huge requests still succeed: glibc falls back to mmap when the heap cannot grow.)
It also keeps the holes: a block freed between two live ones is reused only by requests that fit in
it, so a step whose tensors come in other sizes than the last one's grows the heap instead (measured
at ep=4 in `moe bench memory`: 1.5x the peak of live tensors).

`return_freed_memory()` is the other policy (train.keep_freed_memory=false): every block of 1 MiB or
more is its own mmap, unmapped when freed, so the resident memory follows the live tensors (glibc's
default threshold rises to 32 MiB after the first large free and then behaves like the heap above).
The price is the page faults of every large tensor, every step.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3
_TRIM_NEVER = -1  # mallopt(3): "setting M_TRIM_THRESHOLD to -1 disables trimming completely"
RETURN_THRESHOLD = 1 << 20
"""Blocks from this size up are mapped on their own by `return_freed_memory` (a fixed threshold: glibc
no longer raises it)."""

_applied = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def can_keep_freed_memory() -> bool:
    """Whether `keep_freed_memory` can take effect here (Linux with glibc), without applying it."""
    return _libc() is not None


def keep_freed_memory() -> bool:
    """Large freed blocks stay in the process (glibc: no mmap-ed blocks, no heap trimming). Process-wide
    and idempotent; returns whether it is in effect (False on other platforms and C libraries, e.g.
    macOS or musl, where nothing changes)."""
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; both or nothing (a half-applied policy would still page-fault)
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied


def return_freed_memory() -> bool:
    """Blocks of RETURN_THRESHOLD bytes or more are mmap-ed and unmapped when freed (a fixed mmap
    threshold, which also stops glibc from raising it). Process-wide; returns whether it is in effect
    (False off glibc, or when `keep_freed_memory` was applied first: one policy per process)."""
    libc = _libc()
    if libc is None or _applied:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, RETURN_THRESHOLD))


def release_free_memory() -> None:
    """Give the process's free heap pages back to the OS now (glibc malloc_trim), e.g. between benchmark
    phases of very different sizes; the next allocations fault their pages in again."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
