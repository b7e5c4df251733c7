"""Keep large freed blocks in the server process instead of handing them back to the OS.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB
on 64-bit) with a fresh ``mmap`` and trims the heap top above
``M_TRIM_THRESHOLD``, so each Normalize call's multi-MiB buffers (request
bytes, ``y``, the response) come as new pages that fault in one by one: on
these machines that cost a 4 MiB call more CPU than computing it.  With the
thresholds raised the freed blocks are reused by the next call.

:func:`keep_large_blocks` is what ``normsvc serve`` calls at start-up (the
server process only: the library and the client leave the allocator alone).
It does nothing on other C libraries (musl, macOS) or when the operator set
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment.
The price is memory: each malloc arena may keep up to the trim threshold of
freed memory (the process RSS stays near its peak).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_large_blocks", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: Allocations below this come from the heap (and are reused), not from mmap (bytes).
MMAP_THRESHOLD = 128 << 20
#: Free memory at the heap top kept before trimming (bytes).
TRIM_THRESHOLD = 256 << 20

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_blocks(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds; True if they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the operator's choice wins
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
