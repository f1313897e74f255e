"""Keeps a process's freed bulk buffers in its heap for reuse, where the C library is glibc.

A KV transfer receives chunks of a few MiB. gRPC reads each into buffers from malloc and hands it to the
deserializer as a new bytes object; both are freed once the chunk is stored. glibc's defaults return such
buffers to the kernel: allocations above a threshold (128 KiB, raised to the size of the last one freed, at most
32 MiB) are mmap'd and unmapped on free, and free space above the trim threshold (twice that) at the top of the
heap is released. The next chunk then faults in every 4 KiB page again and the kernel zeroes it: a receiver
streaming 4 MiB chunks took 0.5-1 million minor faults per 5 s, against a few thousand with the buffers kept, and
the gRPC ceiling of benchmarks/kv_transfer.py rose by 40-50% on a 2-core machine
(benchmarks/results/2026-12-06-kv-transfer-malloc.md).

`retain_freed_buffers(n)` sets both thresholds with mallopt so that buffers up to 2n bytes come from the heap and
up to 16n bytes of free heap stay mapped. These are process-wide settings: they only ever rise here, and they cost
at most that much resident memory per malloc arena that handled such buffers.
"""
from __future__ import annotations

import ctypes
import platform
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc refuses larger: 32 MiB on 64-bit
_TRIM_PER_THRESHOLD = 8

_lock = threading.Lock()
_retained = 0  # the largest buffer size set so far (mallopt's settings cannot be read back)


def retain_freed_buffers(largest_bytes: int) -> bool:
    """Lets this process's malloc keep freed buffers of up to 2 x largest_bytes (at most 32 MiB) for reuse instead
    of returning them to the kernel (module docstring). True when the settings are in force (now or from an
    earlier call with a larger size); False where the C library is not glibc or refused them."""
    if largest_bytes <= 0:
        raise ValueError(f"largest_bytes: must be positive, got {largest_bytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global _retained
    threshold = min(_MMAP_THRESHOLD_MAX, 2 * largest_bytes)
    with _lock:
        if threshold <= _retained:
            return True
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
            return False
        if libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_PER_THRESHOLD * threshold) != 1:
            return False
        _retained = threshold
        return True
