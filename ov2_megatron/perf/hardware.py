"""Accelerators the planner knows: datasheet peaks, and the few per-generation constants the
step-time model is calibrated with (docs/benchmarks/planner_vs_published.md).

Peaks are the vendors' dense (no sparsity) tensor-core numbers for SXM parts:
  A100  https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
        312 TFLOP/s bf16, 2.039 TB/s HBM2e (80 GB), NVLink 3 600 GB/s bidirectional
  H100  https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
        989 TFLOP/s bf16 (1,979 "with sparsity" halved), 3.35 TB/s HBM3, NVLink 4 900 GB/s
  H200  https://www.nvidia.com/en-us/data-center/h200/  same GH100 die and clocks as H100,
        4.8 TB/s HBM3e, 141 GB
  B200  https://www.nvidia.com/en-us/data-center/hgx/  (HGX B200: 2.25 PFLOP/s dense bf16 per
        GPU, 8 TB/s HBM3e, NVLink 5 1.8 TB/s bidirectional)
Bandwidths are *achievable* collective bus bandwidths (what nccl-tests reports as busbw,
https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md), not link maxima: an
8-GPU NVLink 4 board all-reduces at ~360 GB/s busbw, NVLink 3 at ~230 GB/s; one NIC per GPU
(HDR 200 Gb/s on DGX A100, NDR 400 Gb/s on DGX H100/B200) reaches ~80% of line rate.
Memory capacity is what torch.cuda reports (an "80 GB" H100 shows 79.2 GiB).

The calibrated constants (one set per generation, none per workload):
  gemm_efficiency   fraction of the peak a large bf16 GEMM sustains inside a training step
                    (cuBLAS/cuBLASLt at realistic clocks and power, not the isolated best case)
  gemm_half_dim     the smallest GEMM dimension at which half of it is left: tile and wave
                    quantisation (https://docs.nvidia.com/deeplearning/performance/
                    dl-performance-matrix-multiplication/index.html); Hopper's 128-wide wgmma
                    tiles make it twice Ampere's
  attention_efficiency  fused (flash) attention forward+backward as a fraction of the peak:
                    FlashAttention-2 reaches 50-73% of A100 peak forward and ~60% fwd+bwd
                    (Dao 2023, https://arxiv.org/abs/2307.08691); FlashAttention-3 / cuDNN
                    reach 75% forward but ~50% fwd+bwd on H100 (Shah et al. 2024,
                    https://arxiv.org/abs/2407.08608)
  hbm_efficiency    fraction of the HBM datasheet bandwidth a streaming kernel reaches
                    (STREAM-like copies reach 90-92% on A100/H100; elementwise kernels with
                    reductions less)
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
    """Datasheet bytes/s; bounds elementwise kernels and the optimizer step."""
    intra_node_bandwidth: float
    """Achievable collective bus bandwidth between GPUs of one node (NVLink), bytes/s."""
    inter_node_bandwidth: float
    """Achievable per-GPU bus bandwidth across nodes (one NIC per GPU), bytes/s."""
    gpus_per_node: int = 8
    gemm_efficiency: float = 0.75
    """Fraction of bf16_flops a large GEMM sustains in a training step (see module doc)."""
    gemm_half_dim: int = 128
    """Smallest GEMM dimension at which gemm_efficiency has fallen to half."""
    attention_efficiency: float = 0.5
    """Fused attention forward + backward as a fraction of bf16_flops."""
    hbm_efficiency: float = 0.85
    """Fraction of hbm_bandwidth that elementwise kernels reach."""

    @property
    def elementwise_bandwidth(self) -> float:
        return self.hbm_bandwidth * self.hbm_efficiency


ACCELERATORS = {
    # A100: Megatron-LM's 2021 runs sustain 44-52% of peak *including* pipeline bubbles,
    # TP communication and recomputation, which puts its GEMMs at ~0.8 of peak (~250 TFLOP/s,
    # the figure NVIDIA's GEMM guide shows for large fp16/bf16 GEMMs on A100).
    "a100": Accelerator("A100 SXM 80GB", 312e12, 0.0, 79.2, 2.039e12, 230 * GB, 20 * GB,
                        gemm_efficiency=0.80, gemm_half_dim=64, attention_efficiency=0.55),
    # H100 SXM: 0.55 of the 989 TFLOP/s datasheet peak (~545 TFLOP/s) is what the published
    # bf16 runs by the same software imply: NeMo measures H100/A100 = 1.67-2.06x, not the
    # datasheet 3.17x (sustained tensor-core load lowers clocks at 700 W; non-TE kernels do
    # not use Hopper's wgmma/TMA paths). Calibrated on the H100 rows of the table; a
    # TE-era megatron-core run (47% MFU claimed for GPT-3 175B) would be under-predicted.
    "h100": Accelerator("H100 SXM 80GB", 989e12, 1979e12, 79.2, 3.35e12, 360 * GB, 40 * GB,
                        gemm_efficiency=0.55, gemm_half_dim=128, attention_efficiency=0.40),
    # H200: the H100 die with faster, larger HBM; compute constants are H100's.
    "h200": Accelerator("H200 SXM 141GB", 989e12, 1979e12, 139.8, 4.8e12, 360 * GB, 40 * GB,
                        gemm_efficiency=0.55, gemm_half_dim=128, attention_efficiency=0.40),
    # B200: not checked against a published bf16 dense training run (none found with a
    # full configuration); the fractions are H100's, an unverified assumption.
    "b200": Accelerator("B200 180GB", 2250e12, 4500e12, 178.4, 8.0e12, 720 * GB, 40 * GB,
                        gemm_efficiency=0.55, gemm_half_dim=128, attention_efficiency=0.40),
}


def accelerator(name: str, **overrides) -> Accelerator:
    key = name.lower()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown GPU {name!r}: use one of {', '.join(ACCELERATORS)}")
    return replace(ACCELERATORS[key], **{k: v for k, v in overrides.items() if v is not None})
