"""Analytic FLOPs of one OpenVision 2 training sample.

A matmul of [m, k] x [k, n] costs 2mkn FLOPs. Per sample, with ViT width w, MLP m_v and
sequence s_v = prefix + N patches; decoder width d, MLP m_d, sequence s_d = K + T:
    patch embedding      2 * N * (c p^2) * w
    each ViT layer       QKV 6 s w^2 + output 2 s w^2 + MLP 4 s w m + scores/values 4 s^2 w
    projection           2 * K * w * d
    each decoder layer   the same with (s_d, d, m_d); the causal mask is not exploited, so
                         the full s_d^2 is counted (as executed by the kernels here)
    head                 2 * T * d * V (text positions only; padded vocabulary)
Backward costs twice the forward (grads of inputs and of weights); full recomputation adds
one more forward. Norms, softmax, GELU and the loss are O(s h) and left out (<1%).
"""

from __future__ import annotations

from ov2_megatron.config import ModelConfig, SequenceGeometry
from ov2_megatron.parallel.pipeline_split import layer_flops


def forward_flops_per_sample(model: ModelConfig, geom: SequenceGeometry) -> float:
    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    embed = 2 * geom.num_patches * model.vision.in_channels * patch * patch * vit.width
    encoder = vit.depth * layer_flops(vit, geom.vit_seq)
    projection = 2 * geom.num_kept * vit.width * dec.width
    decoder = dec.depth * layer_flops(dec, geom.decoder_seq)
    head = 2 * geom.text_len * dec.width * geom.padded_vocab
    return embed + encoder + projection + decoder + head


def train_flops_per_sample(model: ModelConfig, geom: SequenceGeometry,
                           recompute: str = "none") -> float:
    forwards = 3 + (1 if recompute == "full" else 0)
    return forwards * forward_flops_per_sample(model, geom)


# Dense bf16 tensor-core peaks (FLOP/s) used for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12,
             "GB200": 2500e12, "L40S": 362e12}


def device_peak_flops() -> tuple[str, float | None]:
    """(device name, bf16 peak or None when unknown / on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return name, peak
    return name, None
