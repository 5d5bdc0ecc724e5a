"""How long a training step waits for communication, split by what the communication is for.

CPU / gloo (`BlockedTimer`): every c10d collective and p2p op ends in `Work.wait()` (the
synchronous API calls it itself), and gloo runs the transfer on its own threads, so the host
time inside `wait()` is time the step could not compute: exposed communication, including
waiting for a slower peer (load imbalance, and the pipeline bubble for p2p receives). We wrap
`Work.wait` for the duration of the timed steps (megatron keeps module-level references to
the collective functions, so wrapping those would miss calls) and attribute each wait to the
megatron module that issued it: p2p_communication -> pipeline, tensor_parallel -> tensor,
param_and_grad_buffer / distributed optimizer -> data, clip_grads / the rest -> other.

CUDA / NCCL (`exposed_from_kernels`): host-side waits mean nothing (launches are
asynchronous), so one extra step runs under torch.profiler and exposed communication is the
time NCCL kernels run while no compute kernel does: |union(nccl) - union(compute)|.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager

KINDS = ("tensor", "pipeline", "data", "other")
_MODULE_KIND = (
    ("megatron.core.pipeline_parallel", "pipeline"),
    ("megatron.core.tensor_parallel", "tensor"),
    ("megatron.core.distributed", "data"),
    ("megatron.core.optimizer.distrib_optimizer", "data"),
    ("ov2_megatron.models", "tensor"),  # vocab-parallel argmax, SP gathers in our modules
)


def _kind_of_caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        for prefix, kind in _MODULE_KIND:
            if name.startswith(prefix):
                return kind
        if name.startswith("megatron") or name.startswith("ov2_megatron"):
            return "other"
        frame = frame.f_back
    return "other"


class BlockedTimer:
    """Seconds the host spends inside c10d `Work.wait()`, by kind, while `active()`."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def active(self):
        from torch._C._distributed_c10d import Work

        original = Work.wait
        seconds, calls = self.seconds, self.calls

        def timed_wait(work, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(work, *args, **kwargs)
            finally:
                kind = _kind_of_caller()
                seconds[kind] += time.perf_counter() - start
                calls[kind] += 1

        Work.wait = timed_wait
        try:
            yield self
        finally:
            Work.wait = original

    def total(self) -> float:
        return sum(self.seconds.values())


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def exposed_time(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Length of union(comm) not covered by union(compute), in the intervals' unit."""
    covered, i = 0.0, 0
    busy = _union(compute)
    total = 0.0
    for start, end in _union(comm):
        total += end - start
        while i < len(busy) and busy[i][1] <= start:
            i += 1
        j = i
        while j < len(busy) and busy[j][0] < end:
            covered += min(end, busy[j][1]) - max(start, busy[j][0])
            j += 1
    return total - covered


def exposed_from_kernels(events) -> tuple[float, float]:
    """(exposed, total) NCCL seconds from torch.profiler events (FunctionEvent list)."""
    from torch.autograd import DeviceType

    comm, compute = [], []
    for event in events:
        if event.device_type != DeviceType.CUDA:
            continue
        span = (event.time_range.start / 1e6, event.time_range.end / 1e6)  # us -> s
        (comm if "nccl" in event.name.lower() else compute).append(span)
    total = sum(b - a for a, b in _union(comm))
    return exposed_time(comm, compute), total
