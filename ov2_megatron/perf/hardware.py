"""Accelerators the planner knows: datasheet peaks and the bandwidths it assumes.

Compute peaks are the vendors' dense (no sparsity) tensor-core numbers for SXM parts.
Bandwidths are *achievable* collective bus bandwidths (what nccl-tests reports as busbw),
not link maxima: NVLink 4 moves 450 GB/s per direction, all-reduce reaches ~360 GB/s on an
HGX H100/H200 board; one 400 Gb/s InfiniBand NIC per GPU (50 GB/s) reaches ~40 GB/s across
nodes. Memory capacity is what torch.cuda reports (an "80 GB" H100 shows 79.2 GiB).
Each value can be overridden on the command line of tools/plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    fp8_flops: float
    memory_gib: float
    """Device memory as torch reports it."""
    hbm_bandwidth: float
    """Bytes/s; bounds the optimizer step, which is memory-bound."""
    intra_node_bandwidth: float
    """Achievable collective bus bandwidth between GPUs of one node (NVLink), bytes/s."""
    inter_node_bandwidth: float
    """Achievable per-GPU bus bandwidth across nodes (one NIC per GPU), bytes/s."""
    gpus_per_node: int = 8


ACCELERATORS = {
    "h100": Accelerator("H100 SXM 80GB", 989e12, 1979e12, 79.2, 3.35e12, 360 * GB, 40 * GB),
    "h200": Accelerator("H200 SXM 141GB", 989e12, 1979e12, 139.8, 4.8e12, 360 * GB, 40 * GB),
    "a100": Accelerator("A100 SXM 80GB", 312e12, 0.0, 79.2, 2.0e12, 230 * GB, 20 * GB),
    "b200": Accelerator("B200 180GB", 2250e12, 4500e12, 178.4, 8.0e12, 720 * GB, 40 * GB),
}


def accelerator(name: str, **overrides) -> Accelerator:
    key = name.lower()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown GPU {name!r}: use one of {', '.join(ACCELERATORS)}")
    return replace(ACCELERATORS[key], **{k: v for k, v in overrides.items() if v is not None})
