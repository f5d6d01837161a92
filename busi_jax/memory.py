"""Keeps freed memory in the process for reuse: no page faults per train step (issue #9).

XLA:CPU allocates a jitted function's scratch ("temp") buffer anew on every
call: 376 MB for the width-16 U-Net++ bf16 train step at batch 16
(``compiled.memory_analysis().temp_size_in_bytes``). glibc's malloc serves a
block that large with a fresh ``mmap`` (from a worker thread's arena it has
no other way) and unmaps it on ``free``, so every step page-faults through
the whole buffer while the kernel zeroes each 4 KB page: ~92,000 minor
faults per step, measured with ``getrusage``. (PyTorch's CPU tensors come
from the same glibc malloc; its benchmark rows gain from this setting too.)

:func:`keep_freed_memory` asks glibc, through ``mallopt``, for one arena, no
``mmap`` for large blocks and no trimming, so a freed block stays in the heap
and the next step reuses its pages: 0 faults per step and a 7-12% faster step
on the project's 2-core machine (docs/BENCHMARKS.md, thirteenth session).
The cost: the process keeps its peak heap until it exits, and malloc takes
one lock. ``launch.py`` runs call it, and the benchmark's workers (PyTorch's
too) with ``--keep_freed_memory``; a library user may call it first thing in
a training script. Batch-1 inference timed slower under it on this machine
(BENCHMARKS), so inference paths do not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int.


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


@functools.cache
def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse; call before JAX's first computation.

    The arena limit only holds for threads that have not yet allocated, so
    once JAX's backend (and its thread pool) is up this changes nothing.

    Returns:
      True if the settings were applied; False on a C library without
      ``mallopt`` (not glibc) or once the JAX backend is initialised.
    """
    if _backends_initialized():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    return all(mallopt(param, value) == 1 for param, value in settings)
