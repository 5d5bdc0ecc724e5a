"""glibc malloc on CPU runs: keep freed memory for the next step instead of returning it.

torch's CPU allocator is plain malloc. glibc serves an allocation above its mmap threshold
(adaptive, at most 32 MiB) with its own mapping and unmaps it on free, and gives the top of
the heap back above its trim threshold. A training step frees and allocates the same
activations, attention scores and gradients every step, so every step faults the same pages
in again: at keep ratio 1.0 on the scaled ViT-L/14, 193 MiB faulted per step and 189 ms of
system time, against 49 MiB and 118 ms with the settings below
(docs/benchmarks/2026-12-02-keep-ratio-cost.md; the gain on whole training steps is in
docs/benchmarks/2026-12-02-cpu-allocator.md).

`reuse_freed_memory()` sets M_MMAP_MAX to 0 (every allocation from the heap, where a freed
block is reused) and M_TRIM_THRESHOLD to its largest value (2 GiB: the heap top is kept).
The process then stays at its peak resident size, which a training process reaches every
step anyway. It is applied by `parallel.initialize` on CPU, and not:
  - on CUDA: the caching allocator already reuses device memory;
  - with `OV2_CPU_MALLOC=glibc` in the environment: glibc's adaptive defaults are kept;
  - when the environment tunes malloc itself (any MALLOC_*_ variable, or glibc.malloc in
    GLIBC_TUNABLES): that choice wins, e.g. the peak-memory method's pinned threshold
    (perf/peak_memory.py);
  - where the C library is not glibc (no mallopt).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
OPT_OUT = "OV2_CPU_MALLOC"

_applied: str | None = None


def environment_tunes_malloc() -> bool:
    """True when the process was started with its own malloc settings."""
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def reuse_freed_memory() -> str:
    """Apply the settings once per process; returns what was done, for the start line."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> str:
    if os.environ.get(OPT_OUT) == "glibc":
        return f"malloc with glibc's defaults ({OPT_OUT}=glibc)"
    if environment_tunes_malloc():
        return "malloc as the environment sets it (MALLOC_*_ / GLIBC_TUNABLES)"
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return f"malloc unchanged (no mallopt in {name or 'the C library'})"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD)):
        return "malloc unchanged (mallopt refused)"
    return "malloc keeps freed memory for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
