"""Choose between a kernel's Triton path and its torch reference.

Every op in this package takes `backend="auto" | "torch" | "triton"`:
  - "auto":   Triton when the tensors live on CUDA and Triton imports, torch otherwise. CPU
              training and every machine without Triton take the torch path.
  - "torch":  the torch implementation, anywhere.
  - "triton": the Triton path, anywhere. On CPU this only works under Triton's interpreter
              (`TRITON_INTERPRET=1`), which is how the CPU tests exercise the kernels.

Triton is imported lazily (`import kernels` never touches it) for two reasons: it is an
optional dependency, and `triton.jit` reads `TRITON_INTERPRET` when a kernel is *defined*, so
defining kernels at import time would freeze the interpreter choice too early.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install, or triton blocked in sys.modules
        return False


def triton_interpreted() -> bool:
    """True when Triton kernels will run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve `backend` for these tensors; raise with the fix when "triton" cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return False
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton==3.9.0")
    if not on_cuda and not triton_interpreted():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (or use backend='auto' / 'torch')"
        )
    return True
