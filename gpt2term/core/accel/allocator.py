"""Training on a CPU keeps the memory it frees, for its next step.

glibc hands every block above its mmap threshold (which it raises to 32 MB at most) back to the kernel when it is
freed. A training step frees and allocates anew its gradients (the token table's and the head's are tens of MB
each), the loss's slices and the larger activations, so the kernel zero-fills every page of them again, step after
step. While `freed_memory_kept` is open, freed blocks stay in the heap and the next step reuses them; when it
closes, glibc's own steady state comes back and the heap is trimmed, so an app that trained once does not hold the
memory afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_KEEP = (1 << 31) - 1  # both thresholds as high as mallopt takes: nothing freed goes back while training
# What glibc's dynamic thresholds settle at once a large block has been freed (mmap at most 32 MB on 64 bits,
# trim at twice that): setting either by hand turns the dynamic scheme off, so closing restores its end point.
_GLIBC_STEADY = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}


_SORTING_REQUEST = 1 << 40  # bytes: more than any free block, and mapped lazily (never touched) if it is granted


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # musl: its mallopt knows none of these thresholds
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def available() -> bool:
    """Whether this process's allocator is glibc's, whose thresholds `freed_memory_kept` raises."""
    return _glibc() is not None


@contextlib.contextmanager
def freed_memory_kept(on: bool = True) -> Iterator[bool]:
    """Keep freed memory in the heap while open (yields whether it does: `on`, and glibc is the allocator)."""
    libc = _glibc() if on else None
    if libc is None:
        yield False
        return
    kept = all(libc.mallopt(param, _KEEP) == 1 for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    try:
        yield kept
    finally:
        for param, value in _GLIBC_STEADY.items():
            libc.mallopt(param, value)
        # malloc_trim gives back only what sits in malloc's sorted bins; a request no free block can meet sorts
        # the freshly freed ones there first (it is then mapped on its own, never touched, and unmapped).
        libc.free(libc.malloc(_SORTING_REQUEST))
        libc.malloc_trim(0)
