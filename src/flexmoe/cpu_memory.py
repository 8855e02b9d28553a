"""Keep freed host memory in the process, the CPU counterpart of CUDA's caching allocator.

On the CPU, PyTorch takes every tensor's memory from the C library's malloc. glibc serves blocks
above its mmap threshold (at most 32 MiB) with fresh mmap()s and unmaps them on free, so a large
activation allocated in every step is page-faulted in again every step: on the machines this project
is measured on, a fresh 64 MiB tensor costs ~40 ms of page faults before the first byte is useful,
as long as the GELU over it. CUDA has no such cost because PyTorch's caching allocator keeps freed
blocks. `retain_freed_memory` makes glibc behave alike: no mmap for large blocks and no trimming of
the heap, so freed blocks are reused in the next step. The price is that the process keeps its peak
heap size. It is a process-wide setting, so only entry points (benchmarks, training) call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux, else None (e.g. musl: its allocator has other knobs)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse; True if applied (glibc on Linux), else False."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    no_mmap = libc.mallopt(_M_MMAP_MAX, 0)
    no_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(no_mmap and no_trim)


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), e.g. between two workloads
    of a benchmark: a heap that keeps freed memory keeps its peak, and the holes between live blocks
    let the next workload's other sizes grow it further (`bench dist --anchors`, W = 2: 2.7 GiB
    resident per rank after the fine-grained workload, 0.65 GiB once released). True if glibc
    released anything."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
