"""Kernel tests run every Triton kernel: compiled on a GPU, in Triton's interpreter on CPU.

`triton.jit` reads TRITON_INTERPRET when a kernel is defined, and kernels/ defines its kernels
lazily on first use, so setting it here, before any test runs, is early enough. On a CUDA
machine it is left alone so that the same tests exercise the compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where the Triton-path tests put their tensors: CUDA if present, else the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    return "cpu"


@pytest.fixture
def triton_device(device) -> str:
    """`device`, but skip when triton is not installed (the torch-path tests still run)."""
    pytest.importorskip("triton")
    return device
