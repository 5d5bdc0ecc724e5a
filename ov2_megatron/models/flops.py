"""Analytic FLOPs of one OpenVision 2 training sample, and the peaks MFU is measured against.

A matmul of [m, k] x [k, n] costs 2mkn FLOPs. Per sample, with ViT width w, MLP m_v and
sequence s_v = prefix + N patches; decoder width d, MLP m_d, sequence s_d = K + T:
    patch embedding      2 * N * (c p^2) * w
    each ViT layer       QKV 6 s w^2 + output 2 s w^2 + MLP 4 s w m + scores/values 4 s^2 w
    projection           2 * K * w * d
    each decoder layer   the same with (s_d, d, m_d); the causal mask is not exploited, so
                         the full s_d^2 is counted (as executed by the kernels here)
    head                 2 * T * d * V (text positions only; V the padded vocabulary for the
                         plain head, the real one for the chunked loss, which skips padding)
The forward F is the sum. Backward: every matmul y = x W needs dx = dy W^T and dW = x^T dy,
twice its forward, except the patch embedding, whose input (pixels) needs no gradient: it
pays only dW. So one training step costs 3F - embed ("model FLOPs", the MFU basis).
Recomputation re-runs forwards inside the transformer blocks during backward (hardware
FLOPs, not model FLOPs): 'full' adds every layer's forward, 'selective' (megatron recomputes
the core attention) adds the 4 s^2 h score/value matmuls of every layer. The embedding,
projection and head sit outside the blocks and are never recomputed by megatron; the chunked
caption loss (decoder.loss_kernel) recomputes the head's logits in backward, +1 head forward.
Norms, softmax, GELU and the loss are O(s h) and left out (<1%); tests/perf checks the total
against torch.utils.flop_counter on the real megatron model within 2%. Sequence lengths are
the real tokens: alignment padding (SP/FP8) is executed but is not useful work, so it is not
in the model FLOPs MFU is measured by.
"""

from __future__ import annotations

from dataclasses import dataclass

from ov2_megatron.config import ModelConfig, SequenceGeometry
from ov2_megatron.parallel.pipeline_split import layer_flops


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of one sample by component."""

    embed: float
    encoder: float
    encoder_attention: float  # the 4 s^2 w part of `encoder` (what selective recompute repeats)
    projection: float
    decoder: float
    decoder_attention: float
    head: float

    @property
    def forward(self) -> float:
        return self.embed + self.encoder + self.projection + self.decoder + self.head


def flop_breakdown(model: ModelConfig, geom: SequenceGeometry) -> FlopBreakdown:
    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    return FlopBreakdown(
        embed=2 * geom.num_patches * model.vision.in_channels * patch * patch * vit.width,
        encoder=vit.depth * layer_flops(vit, geom.vit_tokens),
        encoder_attention=vit.depth * 4 * geom.vit_tokens ** 2 * vit.width,
        projection=2 * geom.num_kept * vit.width * dec.width,
        decoder=dec.depth * layer_flops(dec, geom.decoder_tokens),
        decoder_attention=dec.depth * 4 * geom.decoder_tokens ** 2 * dec.width,
        head=2 * geom.text_len * dec.width * _head_vocab(model, geom))


def _head_vocab(model: ModelConfig, geom: SequenceGeometry) -> int:
    """Vocabulary rows the head multiplies: the chunked loss leaves out the padding rows."""
    return model.decoder.vocab_size if model.decoder.loss_kernel == "chunked" \
        else geom.padded_vocab


def forward_flops_per_sample(model: ModelConfig, geom: SequenceGeometry) -> float:
    return flop_breakdown(model, geom).forward


def recompute_flops_per_sample(model: ModelConfig, geom: SequenceGeometry,
                               recompute: str) -> float:
    """Extra forward FLOPs that activation recomputation re-runs during backward (and the
    chunked loss's recomputed logits)."""
    parts = flop_breakdown(model, geom)
    head = parts.head if model.decoder.loss_kernel == "chunked" else 0.0
    if recompute == "full":
        return parts.encoder + parts.decoder + head
    if recompute == "selective":
        return parts.encoder_attention + parts.decoder_attention + head
    if recompute == "none":
        return head
    raise ValueError(f"recompute {recompute!r}: use none, selective or full")


def model_flops_per_sample(model: ModelConfig, geom: SequenceGeometry) -> float:
    """Forward + backward FLOPs without recomputation: the basis of MFU."""
    parts = flop_breakdown(model, geom)
    return 3 * parts.forward - parts.embed


def train_flops_per_sample(model: ModelConfig, geom: SequenceGeometry,
                           recompute: str = "none") -> float:
    """FLOPs the hardware executes per sample, recomputation included (HFU basis)."""
    return model_flops_per_sample(model, geom) + recompute_flops_per_sample(model, geom, recompute)


# Dense tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets, SXM parts.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12,
             "GB200": 2500e12, "L40S": 362e12}
PEAK_FP8 = {"H100": 1979e12, "H200": 1979e12, "H800": 1979e12, "B200": 4500e12,
            "GB200": 5000e12, "L40S": 733e12}


def device_peak_flops() -> tuple[str, float | None]:
    """(device name, bf16 peak or None when unknown / on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, peak_for(name, PEAK_BF16)


def peak_for(device_name: str, table: dict[str, float]) -> float | None:
    """The table entry whose key occurs in the device name (longest key first: GB200 before
    B200), or None."""
    for key in sorted(table, key=len, reverse=True):
        if key in device_name:
            return table[key]
    return None
