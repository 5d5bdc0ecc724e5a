"""Training runs published by others, as the planner's calibration table.

Each row: the citation, the configuration as published (what the source does not state is
marked as an assumption in `note`), the published throughput, and the planner's prediction
pinned to four significant figures. docs/benchmarks/planner_vs_published.md shows the same
table; tests/perf/test_planner_vs_published.py recomputes every prediction and fails when
either the model or the doc drifts from the pinned value.

Megatron-LM (Narayanan et al. 2021) reports hardware TFLOP/s per GPU by its formula
96 B s l h^2 (1 + s/6h + V/16lh) per iteration, which counts the recomputed forward; a row
converts it to tokens/s/GPU by that same formula so every ratio compares throughputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ov2_megatron.perf import transformer_plan as tp_
from ov2_megatron.perf.hardware import accelerator

BAND = 0.25
"""The goal: every prediction within +-25% of the published throughput."""

NARAYANAN = "https://arxiv.org/abs/2104.04473"  # SC'21, Table 1 (also the Megatron-LM README)
NEMO_VIT = ("https://docs.nvidia.com/nemo-framework/user-guide/latest/multimodalmodels/"
            "visionlanguagefoundation/vit/perf.html")
NEMO_CLIP = ("https://docs.nvidia.com/nemo-framework/user-guide/latest/multimodalmodels/"
             "visionlanguagefoundation/clip/perf.html")
NEMO_VIT_RECIPE = ("https://github.com/NVIDIA/NeMo-Framework-Launcher/blob/main/launcher_scripts/"
                   "conf/training/vit/g_14.yaml")
NEMO_CLIP_RECIPE = ("https://github.com/NVIDIA/NeMo-Framework-Launcher/blob/main/"
                    "launcher_scripts/conf/training/clip/vit_g_14.yaml")
TORCHTITAN = "https://github.com/pytorch/torchtitan/blob/main/docs/performance.md"


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    gpu: str
    workload: tp_.Workload
    layout: tp_.Layout
    published_per_gpu: float
    """Images or tokens per second per GPU, as published (or converted, see `note`)."""
    pinned_per_gpu: float
    """The planner's prediction when this table was last reviewed."""
    note: str
    gpu_overrides: tuple[tuple[str, float], ...] = ()
    outside_band: str = ""
    """Why this row misses the +-25% goal (empty: it must stay inside the band)."""

    @property
    def ratio(self) -> float:
        return self.pinned_per_gpu / self.published_per_gpu

    def predict(self) -> tp_.Prediction:
        gpu = accelerator(self.gpu, **dict(self.gpu_overrides))
        return tp_.predict(self.workload, self.layout, gpu)


def _megatron_gpt(layers, hidden, heads) -> tp_.Workload:
    return tp_.gpt(layers, hidden, heads, 4 * hidden, 2048, 51200)


def _narayanan_tokens(tflops: float, layers: int, hidden: int) -> float:
    """Tokens/s/GPU from the paper's hardware TFLOP/s (its formula, s=2048, V=51200)."""
    s, v = 2048, 51200
    per_token = 96 * layers * hidden ** 2 * (1 + s / (6 * hidden) + v / (16 * layers * hidden))
    return tflops * 1e12 / per_token


def _megatron_row(name, layers, hidden, heads, tp, pp, gpus, batch, tflops, pinned):
    layout = tp_.Layout(gpus, batch, micro_batch=1, tp=tp, pp=pp, recompute="full",
                        stack="legacy", distributed_optimizer=False, overlap_grad_reduce=False,
                        overlap_param_gather=False)
    note = (f"{tflops:g} TFLOP/s/GPU published; full recompute (the paper's formula); "
            "assumed micro-batch 1, no interleaving, fp32 gradient all-reduce not overlapped "
            "(2021 Megatron-LM), fused softmax (no flash attention)")
    return PublishedRun(name, NARAYANAN, "a100", _megatron_gpt(layers, hidden, heads), layout,
                        _narayanan_tokens(tflops, layers, hidden), pinned, note)


VIT_G14_NEMO = tp_.vit(40, 1408, 16, 6144, 224, 14, prefix_tokens=8)
CLIP_G14_NEMO = tp_.clip(tp_.vit(40, 1408, 22, 6144, 224, 14, prefix_tokens=8),
                         24, 1024, 16, 4096, 80)
_VIT_LAYOUT = tp_.Layout(8, 4096, micro_batch=64, stack="legacy", distributed_optimizer=False)
_CLIP_LAYOUT = tp_.Layout(8, 640, micro_batch=80, recompute="full", recompute_layers=(8, 0),
                          stack="legacy", distributed_optimizer=False)
_VIT_NOTE = ("NeMo 23.08 ViT g/14 recipe: TP1 PP1, micro-batch 64, global 4096, bf16 O2, no "
             "recompute, apex layers (legacy stack); 8 class tokens pad the sequence to 264")
_CLIP_NOTE = ("NeMo 23.08 CLIP g/14 recipe: TP1 PP1, micro-batch 80 (640 per step on one "
              "node), bf16, full recompute of 8 of 40 vision layers, text 24 x 1024 at 80 "
              "tokens, legacy stack")

_LEGACY_SLOW = ("the 2023 NeMo multimodal stack runs slower than its kernels account for: "
                "the counted elementwise and unfused-softmax traffic explains about half of "
                "the gap between its 46% (A100) MFU and the GEMMs' 80%")
_CLIP_H100 = ("as the other NeMo rows, and more: the same recipe measures only 1.67x from A100 "
              "to H100 for CLIP against 2.06x for ViT on the same vision tower, which no "
              "per-generation constant reproduces")


def _nemo_row(model: str, gpu: str, node_images_per_s: float, pinned: float,
              outside_band: str) -> PublishedRun:
    """One DGX node (8 GPUs) of NeMo's ViT or CLIP g/14 scaling table."""
    vit = model.startswith("ViT")
    source, recipe = (NEMO_VIT, NEMO_VIT_RECIPE) if vit else (NEMO_CLIP, NEMO_CLIP_RECIPE)
    workload, layout = (VIT_G14_NEMO, _VIT_LAYOUT) if vit else (CLIP_G14_NEMO, _CLIP_LAYOUT)
    note = (_VIT_NOTE if vit else _CLIP_NOTE) + f"; {recipe}"
    return PublishedRun(f"NeMo {model}, 8 {gpu.upper()}", source, gpu, workload, layout,
                        node_images_per_s / 8, pinned, note, outside_band=outside_band)


LLAMA3_8B = tp_.gpt(32, 4096, 32, 14336, 8192, 128256, kv_heads=8, gated=True)
_TITAN_NOTE = ("torchtitan FSDP2 (modelled as distributed optimizer with both overlaps), "
               "selective activation checkpointing (modelled as megatron's selective "
               "recompute), flash attention (SDPA)")

RUNS: tuple[PublishedRun, ...] = (
    _megatron_row("Megatron GPT 18.4B, 256 A100", 40, 6144, 48, 8, 1, 256, 1024, 135, 850.6),
    _megatron_row("Megatron GPT 39.1B, 512 A100", 48, 8192, 64, 8, 2, 512, 1536, 138, 447.5),
    _megatron_row("Megatron GPT 145.6B, 1536 A100", 80, 12288, 96, 8, 8, 1536, 2304, 148,
                  132.0),
    _megatron_row("Megatron GPT 529.6B, 2520 A100", 105, 20480, 128, 8, 35, 2520, 2520, 163,
                  38.21),
    _megatron_row("Megatron GPT 1T, 3072 A100", 128, 25600, 160, 8, 64, 3072, 3072, 163, 20.43),
    _nemo_row("ViT g/14", "a100", 693, 116.9, _LEGACY_SLOW),
    _nemo_row("ViT g/14", "h100", 1428, 229.9, _LEGACY_SLOW),
    _nemo_row("CLIP g/14", "a100", 559, 95.43, _LEGACY_SLOW),
    _nemo_row("CLIP g/14", "h100", 935, 184.9, _CLIP_H100),
    PublishedRun("torchtitan Llama 3 8B, 64 A100", TORCHTITAN, "a100", LLAMA3_8B,
                 tp_.Layout(64, 64, micro_batch=1, recompute="selective"),
                 2973, 3690.0, "local batch 1, seq 8192, selective op AC; " + _TITAN_NOTE),
    PublishedRun("torchtitan Llama 3.1 8B, 8 H100 (500 W)", TORCHTITAN, "h100", LLAMA3_8B,
                 tp_.Layout(8, 16, micro_batch=2, recompute="selective"),
                 5762, 8377.0, "local batch 2, seq 8192, FSDP without torch.compile; Grand "
                 "Teton H100 96 GB HBM2e 2.4 TB/s at a 500 W power limit (HBM modelled, the "
                 "power limit not); " + _TITAN_NOTE,
                 gpu_overrides=(("hbm_bandwidth", 2.4e12), ("memory_gib", 94.0)),
                 outside_band="the 500 W power limit (of 700 W) lowers tensor-core clocks; "
                 "the model has no power term"),
)
