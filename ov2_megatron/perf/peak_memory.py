"""Peak memory of a phase of this process, above a baseline taken before it.

The method follows the device the measured tensors live on (`PeakMemory(device)`; by default
CUDA where it is available): the CUDA counters see nothing of CPU tensors, so a CPU phase
measured on a GPU machine with them would read 0.

CUDA: the caching allocator's own counters (`max_memory_allocated`), exact for tensors.

CPU: the resident-set high-water mark of the process (`VmHWM` in /proc/self/status), reset
with `echo 5 > /proc/self/clear_refs`, minus the resident set before the phase. Why this
measures tensors soundly on CPU (the method of tools/bench_kernels.py):
  - torch's CPU allocator is plain malloc, no caching: a freed tensor leaves the process;
  - with MALLOC_MMAP_THRESHOLD_=65536 in the environment *at process start*, glibc maps every
    allocation >= 64 KiB on its own and unmaps it on free (without it the threshold grows
    after frees and freed memory is kept and reused, hiding later allocations);
  - with MKL_DISABLE_FAST_MM=1 MKL frees its GEMM packing buffers after each call instead of
    caching them (its cache grows with the shapes seen: 6+ MiB here, not a tensor);
  - every tensor that matters is written in full, so touched pages == allocated bytes;
  - callers run the same code once on a tiny model before the baseline (benchmark.py
    `warm_libraries`), so code pages, OpenMP/oneDNN state and gloo's first-use buffers
    (~20-30 MiB) are not charged to the phase.
A tracemalloc or Python-level count would miss torch's allocations entirely; a
TorchDispatchMode tally of live storages would miss memory allocated outside the dispatcher
(gloo, library workspaces) and is blind to what the allocator really holds. The price: what
the warm-up does not touch still counts (~2 MiB here), so tests use models of 50+ MiB.
"""

from __future__ import annotations

import os

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = "65536"
PINNED = {MMAP_ENV: MMAP_THRESHOLD, "MKL_DISABLE_FAST_MM": "1"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cpu_method_available() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK)


class PeakMemory:
    """`baseline()` before the phase's allocations, `reset()` where the peak window opens,
    `peak_bytes()` at its end: the highest memory in the window above the baseline.

    `device`: where the phase's tensors live ("cpu", "cuda", "cuda:N", a torch.device);
    None means CUDA where it is available, else the CPU."""

    def __init__(self, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ValueError(f"PeakMemory({str(self.device)!r}): CUDA is not available; "
                             "measure with device='cpu'")
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.base = 0
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        elif cpu_method_available():
            self.method = ("VmHWM after clear_refs minus VmRSS at the baseline"
                           + ("" if environment_pinned()
                              else f" (unsound: start the process with {PINNED})"))
        else:
            self.method = "unavailable (needs Linux /proc/self/clear_refs)"

    def baseline(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif cpu_method_available():
            self.base = _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif cpu_method_available():
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # VmHWM := VmRSS

    def peak_bytes(self) -> int | None:
        """None where nothing can be measured, including a CUDA window in which this device
        held no tensor at all: the phase ran elsewhere (CPU tensors), and its 0 bytes would
        be no measurement, only a divisor of zero for whoever compares two phases."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return peak - self.base if peak else None
        if cpu_method_available():
            return _status_kib("VmHWM") * 1024 - self.base
        return None

    def process_peak_bytes(self) -> int | None:
        """Everything: allocator total on CUDA (reserved), whole-process RSS peak on CPU."""
        if self.cuda:
            return torch.cuda.max_memory_reserved(self.device)
        if cpu_method_available():
            return _status_kib("VmHWM") * 1024
        return None


def pinned_environment() -> dict[str, str]:
    """The environment a child process needs for a sound CPU measurement."""
    return dict(os.environ, **PINNED)


def environment_pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in PINNED.items())
