"""glibc's malloc set to keep and reuse freed memory, for the benchmark scripts.

XLA:CPU allocates each execution's temporary buffers with malloc (about 0.5 GB for the
conv4 step at K=32) and frees them at its end. glibc serves chunks above its mmap
threshold (32 MiB at most) with a fresh mmap() and unmaps them on free, and XLA's worker
threads get arenas whose heaps (64 MiB) cannot hold such a chunk either, so every step
touches ~125 000 fresh pages. `keep_freed_memory` sets three mallopt() parameters so that
freed memory is reused instead: one arena for every thread, no mmap() for large chunks,
no trimming of the heap's free top. The settings are process-wide and must be made
before the JAX backend starts its threads.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt() parameters, glibc's <malloc.h>


def keep_freed_memory() -> None:
    """glibc's malloc keeps and reuses freed memory (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    for parameter, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)):  # -1: never trim
        if libc.mallopt(parameter, value) != 1:
            raise SystemExit(f"mallopt({parameter}, {value}) failed")
