"""Seconds of one transformer layer on one GPU: GEMMs, attention and elementwise traffic.

    GEMM [m, k] x [k, n]   2mnk / (peak x E x d / (d + d_half)),  d = min(m, n, k)
                           E, d_half per GPU generation (hardware.py): large GEMMs sustain E of
                           the peak, thin ones (few tokens, narrow TP shards) less
    attention core         fused (flash): 4 s^2 h' FLOPs forward (half under a causal mask,
                           which flash kernels skip), x 3.5 with backward (the backward
                           recomputes the scores), at the generation's attention efficiency;
                           unfused (legacy): the two batched GEMMs plus the [a, s, s] softmax
                           traffic below
    elementwise            bytes / (HBM x hbm_efficiency): LayerNorms, bias-GELU, bias-dropout-
                           residual, casts, permutes, read and written once per pass

Elementwise passes per token and layer, forward + backward, counted from the kernels each
software stack launches (x 2 bytes):
  megatron_te  (megatron-core + Transformer Engine, flash attention): 2 LayerNorms (2 h fwd,
               4 h bwd each) + 2 fused bias-dropout-add (4 h fwd, 2 h bwd each) = 24 h, and the
               MLP activation on the m-wide hidden: 5 m (GELU: r+w fwd, 2r+w bwd) or 8 m (SwiGLU
               reads two m-wide halves)
  legacy       (apex / megatron legacy layers, unfused attention, as NeMo's 2023 multimodal
               recipes ran): the above + the q/k/v/context permute copies to [b a, s, d] and
               back (8 h), and the unfused softmax: 11 passes over each [a, s, s] score
               element (bmm output, mask-softmax r+w, PV read; backward dP write, softmax-grad
               2r+w, two bmm reads, P read)
h-wide elementwise work is replicated over the TP ranks unless sequence parallelism shards it;
m-wide and per-head work is split by TP.
"""

from __future__ import annotations

from dataclasses import dataclass

from ov2_megatron.perf.hardware import Accelerator

BYTES = 2  # bf16 activations


@dataclass(frozen=True)
class Stack:
    """What the layer implementation launches: the elementwise passes and the attention kernel."""

    name: str
    hidden_passes: int
    """Passes over h-wide tensors per token per layer, forward + backward."""
    mlp_passes: int
    """Passes over the m-wide MLP hidden (non-gated MLP)."""
    flash_attention: bool
    score_passes: int = 0
    """Passes over each [a, s, s] score element when attention is unfused."""


STACKS = {
    "megatron_te": Stack("megatron_te", hidden_passes=24, mlp_passes=5, flash_attention=True),
    "legacy": Stack("legacy", hidden_passes=32, mlp_passes=5, flash_attention=False,
                    score_passes=11),
}
GATED_MLP_PASSES = 8  # SwiGLU: the activation reads both m-wide halves, its grad writes both


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer as the kernels see it."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    seq: int
    gated: bool = False
    causal: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_gemms(self, tokens: int, tp: int) -> list[tuple[int, int, int]]:
        """(m, n, k) of the forward GEMMs on one TP rank: QKV, out-proj, fc1, fc2."""
        h, m, d = self.hidden, self.ffn, self.head_dim
        qkv = (self.heads + 2 * self.kv_heads) * d
        fc1 = m * (2 if self.gated else 1)
        return [(tokens, qkv // tp, h), (tokens, h, h // tp), (tokens, fc1 // tp, h),
                (tokens, h, m // tp)]

    def linear_flops(self, tokens: int) -> float:
        """Forward FLOPs of the four linears over `tokens` tokens (unsharded)."""
        return sum(2 * a * b * c for a, b, c in self.linear_gemms(tokens, 1))

    def attention_flops(self, sequences: int) -> float:
        """Forward FLOPs of QK^T and PV, full (non-causal) count: the MFU convention."""
        return 4 * sequences * self.seq ** 2 * self.hidden


def gemm_seconds(m: int, n: int, k: int, gpu: Accelerator) -> float:
    smallest = max(1, min(m, n, k))
    efficiency = gpu.gemm_efficiency * smallest / (smallest + gpu.gemm_half_dim)
    return 2 * m * n * k / (gpu.bf16_flops * efficiency)


def _linears(shape: LayerShape, tokens: int, tp: int, gpu: Accelerator) -> float:
    """Forward + backward of the linears: each backward GEMM (dgrad, wgrad) has the forward's
    FLOPs and one of its shapes' permutations, so 3x the forward at the same efficiency."""
    return 3 * sum(gemm_seconds(m, n, k, gpu) for m, n, k in shape.linear_gemms(tokens, tp))


def _attention(shape: LayerShape, sequences: int, tp: int, gpu: Accelerator,
               stack: Stack) -> float:
    """Forward + backward of the attention core on one TP rank."""
    heads = shape.heads // tp
    if stack.flash_attention:
        forward = shape.attention_flops(sequences) / tp * (0.5 if shape.causal else 1.0)
        return 3.5 * forward / (gpu.bf16_flops * gpu.attention_efficiency)
    s, d = shape.seq, shape.head_dim
    per_head = 3 * (gemm_seconds(s, s, d, gpu) + gemm_seconds(s, d, s, gpu))
    scores = stack.score_passes * sequences * heads * s * s * BYTES
    return sequences * heads * per_head + scores / gpu.elementwise_bandwidth


def _elementwise(shape: LayerShape, tokens: int, tp: int, sequence_parallel: bool,
                 gpu: Accelerator, stack: Stack) -> float:
    replicated = tp if not sequence_parallel else 1
    mlp_passes = GATED_MLP_PASSES if shape.gated else stack.mlp_passes
    passes = (stack.hidden_passes * shape.hidden * replicated + mlp_passes * shape.ffn) / tp
    return tokens * passes * BYTES / gpu.elementwise_bandwidth


def layer_seconds(shape: LayerShape, micro_batch: int, tp: int, gpu: Accelerator,
                  stack: Stack, recompute: str = "none", sequence_parallel: bool = False,
                  floor_s: float = 0.0) -> float:
    """Forward + backward (+ recomputed forward) of one layer for one micro-batch."""
    tokens = shape.seq * micro_batch
    linears = _linears(shape, tokens, tp, gpu)
    attention = _attention(shape, micro_batch, tp, gpu, stack)
    elementwise = _elementwise(shape, tokens, tp, sequence_parallel, gpu, stack)
    total = linears + attention + elementwise
    if recompute == "full":  # the forward runs again: a third of each part
        total += total / 3
    elif recompute == "selective":  # megatron re-runs the core attention's forward
        total += attention / 3
    return max(total, floor_s)


def head_seconds(tokens: int, hidden: int, vocab: int, tp: int, gpu: Accelerator) -> float:
    """Output projection + vocab-parallel cross-entropy for `tokens` positions (fwd + bwd):
    the GEMM, and the fp32 logits written, read by the softmax and its gradient (~4 passes)."""
    gemm = 3 * gemm_seconds(tokens, vocab // tp, hidden, gpu)
    return gemm + 4 * tokens * vocab / tp * 4 / gpu.elementwise_bandwidth
