"""Process-level malloc settings that the encoder's CPU speed depends on.

glibc's malloc hands big blocks (above its mmap threshold: 128 KiB at start, raised on the fly to at most
32 MiB) straight back to the kernel when they are freed, trims the top of its heap, and gives each thread
its own arena, whose heaps are unmapped as soon as they empty. A CPU forward allocates and frees
activations of several MB per layer, so every call faulted fresh zeroed pages in: the trunk spent much
of its time in the kernel, and the API server under upload searches took page faults by the hundred
thousand a second from its query threads. With the thresholds raised and one arena for all threads, freed
blocks are reused and the faults stop (the figures: bench/RESULTS.md, "Upload search after the CPU encoding
work", and "Encoder CPU figures moved out of code comments"). The cost is that the process keeps
its peak activation memory (tens of MB for the compact encoder) instead of returning it, and threads share
one malloc lock (Python's own allocator serves the small objects, so the lock is rarely contended).

Call `reuse_freed_memory()` before starting the threads that encode: a thread that already has its own
arena keeps it. `AttributeEncoder` calls it when built, the in-process dispatcher before it starts its
threads, and a Celery worker process at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks up to this size come from (and go back to) the heap: a batch of 8 images' largest activation in
# the compact trunk is 38.5 MB. glibc 2.36 accepts 64 MiB; older ones cap the setting at 32 MiB.
MMAP_THRESHOLDS = (64 * 1024 * 1024, 32 * 1024 * 1024)
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024  # free memory kept at the top of the heap before trimming
DISABLE_ENV = "OMNIATTR_KEEP_MALLOC"  # set to 1 to leave malloc as the process configured it

_lock = threading.Lock()
_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds and use one arena, once per process; False where skipped.

    Skipped on a libc other than glibc, when the environment already tunes malloc (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_ or MALLOC_ARENA_MAX set, or a preloaded jemalloc, tcmalloc or mimalloc), and
    when OMNIATTR_KEEP_MALLOC=1.
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only; musl and others raise AttributeError
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_THRESHOLDS)
    ok = mmap_ok and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and mallopt(M_ARENA_MAX, 1) == 1
    if not ok:
        log.warning("glibc refused the encoder's malloc settings; CPU encoding will run slower")
    return ok
