"""Peak memory of one training rank, from the shapes alone.

    peak = weights + gradients + optimizer state          (static, megatron DDP buffers)
         + step inputs                                     (this replica's micro-batches)
         + in-flight micro-batches x activations kept for backward
         + the largest transient at the peak moment        (head logits, a layer's backward)
         + communication buffers                           (the SP all-gather buffer)
(or, after backward, static + the larger of the optimizer's and the collectives' transients)

Static, per parameter held by the rank (TP shards; PP stage's layers), as built by
training/loop.py: megatron DDP keeps the weights in one contiguous buffer (bf16 or fp32) and
the gradients in an fp32 buffer (grad_reduce_in_fp32); the distributed optimizer keeps Adam's
two moments (fp32) and, for bf16 weights, an fp32 master copy, each sharded over the DP
ranks. With fp32 weights the "master" is a view of the weight buffer: no copy.

Activations per layer and micro-batch (s tokens, b images, h width, m MLP width, a heads,
t = TP, f = 1/t under sequence parallelism else 1, e = bytes of the compute dtype), what
megatron's layers save for backward:
    LN1 input, LN1 output, LN2 input, LN2 output     4 s b h e f  (SP saves local shards;
                                                                   linears re-gather in bwd)
    fused QKV output (q, k, v are views of it)       3 s b h e / t
    attention context (input of the out-projection)  s b h e / t
    fc1 output (GELU input), GELU output (fc2 input) 2 s b m e / t
    LayerNorm mean and rstd (fp32)                   16 s b f
    attention probabilities, unfused kernel only     a b s^2 / t x (4 fp32, or 4 + 2 bf16:
                                                     softmax keeps fp32, the PV matmul bf16)
  = e s b (4 h f + 4 h / t + 2 m / t) + ... ; with e = 2, flash attention, t = 1 this is
  the 32 s b h of Korthikanti et al. (2022) without dropout masks (dropout is 0 here).
Recomputation: 'full' keeps only each layer's input (and re-materialises one layer during
its backward); 'selective' (megatron's core-attention recompute) drops the probabilities.
Outside the layers: images (saved by the patch conv; a bf16 copy when the weights are bf16),
the encoder's final-norm input, the kept tokens (projection input), the decoder's final-norm
input and output (the head's input is a view of the output), and the fp32 softmax of the
vocab-parallel cross-entropy [T, b, V/t]. While the loss is formed (and again when its
gradient flows back) a second [T, b, V/t] fp32 tensor is alive: the head's transient.

Pipelining (1F1B): stage r holds min(P - r, M) micro-batches in flight (megatron's warm-up
count + 1) and keeps each one's output tensor (deallocate_pipeline_outputs is off); the
interleaved schedule holds (P - r - 1) * 2 + (V - 1) * P + 1 chunk-micro-batches.

Not modelled: the CUDA context, NCCL/gloo internal buffers, allocator fragmentation (the
planner reserves headroom for them), and tensors under a few KiB.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ov2_megatron.config import ModelConfig, ParallelConfig, SequenceGeometry
from ov2_megatron.parallel.pipeline_split import StagePlan, chunk_index, plan_stages
from ov2_megatron.variants import TransformerShape

GiB = 2**30
BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class KernelProfile:
    """What the layer implementation keeps for backward, and its optimizer's transients."""

    name: str
    flash_attention: bool
    """Fused attention (TE / cuDNN / flash): no [b, a, s, s] probabilities are kept."""
    foreach_optimizer: bool
    """torch's foreach Adam (GPU default without TE/Apex) holds one extra fp32 copy of the
    optimizer shard during the step; TE/Apex fused Adam and CPU's per-tensor Adam do not."""
    collective_copies: bool
    """gloo's (coalesced) reduce-scatter and all-gather copy the whole bucket (measured: 1x
    the buffer; megatron keeps one bucket when grad-reduce overlap is off, as on CPU); NCCL
    works in place with small fixed buffers."""


PROFILES = {
    "cpu_local": KernelProfile("cpu_local", flash_attention=False, foreach_optimizer=False,
                               collective_copies=True),
    "gpu_local": KernelProfile("gpu_local", flash_attention=False, foreach_optimizer=True,
                               collective_copies=False),
    "gpu_te": KernelProfile("gpu_te", flash_attention=True, foreach_optimizer=False,
                            collective_copies=False),
}


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step is cut: what the memory of a rank depends on besides the model."""

    micro_batch: int
    micro_batches: int
    """Micro-batches per step on one replica (gradient accumulation)."""
    data_parallel: int = 1
    precision: str = "bf16"
    recompute: str = "none"
    distributed_optimizer: bool = True


@dataclass
class RankMemory:
    """Predicted bytes on one pipeline rank (every TP/DP rank of a stage is alike)."""

    pipeline_rank: int
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    inputs: float
    activations: float
    """Kept for backward, over all in-flight micro-batches."""
    transient: float
    """Extra bytes alive at the activation peak (head logits, one layer's backward)."""
    optimizer_transient: float
    """Extra bytes alive after backward (gradient reduce-scatter, optimizer step, weight
    all-gather), when the activations are gone."""
    buffers: float
    in_flight: int
    parts: dict = field(default_factory=dict)
    """Activation bytes of one micro-batch by component (for reports)."""

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> float:
        dynamic = max(self.activations + self.transient, self.optimizer_transient)
        return self.static + self.inputs + self.buffers + dynamic


# --- parameters ---------------------------------------------------------------------------

def layer_parameters(shape: TransformerShape, tp: int) -> int:
    """One pre-LN layer on one TP rank: QKV, fc1 (and their biases) and the weights of the
    out-projection and fc2 are sharded; row-parallel biases and LayerNorms are replicated."""
    h, m = shape.width, shape.mlp_dim
    sharded = 3 * h * h + 3 * h + h * h + m * h + m + h * m
    return sharded // tp + 2 * h + 4 * h


def chunk_parameters(plan: StagePlan, model: ModelConfig, geom: SequenceGeometry,
                     tp: int) -> int:
    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    w, d = vit.width, dec.width
    count = 0
    if plan.has_embedding:
        count += model.vision.in_channels * patch * patch * w
        count += (int(model.vision.class_token) + geom.num_registers) * w
        count += geom.num_patches * w if model.vision.pos_embed == "learned" else 0
    count += plan.num_vit_layers * layer_parameters(vit, tp)
    if plan.has_boundary:
        count += 2 * w + w * d + geom.padded_vocab * d // tp
        count += geom.decoder_tokens * d if model.decoder.pos_embed == "learned" else 0
    count += plan.num_decoder_layers * layer_parameters(dec, tp)
    if plan.has_head:
        count += 2 * d + geom.padded_vocab * d // tp
    return count


def stage_plans(model: ModelConfig, parallel: ParallelConfig,
                geom: SequenceGeometry) -> list[StagePlan]:
    """The same FLOP-balanced split build_chunks uses, in megatron's global chunk order."""
    vit, _ = model.vision.shape()
    dec = model.decoder.shape()
    head_flops = 2 * geom.text_len * dec.width * geom.padded_vocab
    chunks = parallel.pipeline * (parallel.virtual_pipeline or 1)
    return _plans(vit, geom.vit_seq, dec, geom.decoder_seq, head_flops, chunks)


@functools.lru_cache(maxsize=1024)  # the planner asks for the same split many times
def _plans(vit, vit_seq, dec, decoder_seq, head_flops, chunks) -> list[StagePlan]:
    return plan_stages(vit, vit_seq, dec, decoder_seq, head_flops, chunks)


# --- activations --------------------------------------------------------------------------

def layer_activations(shape: TransformerShape, seq: int, b: int, parallel: ParallelConfig,
                      e: int, profile: KernelProfile, recompute: str) -> float:
    """Bytes one layer keeps for backward for one micro-batch (see the module docstring)."""
    t = parallel.tensor
    f = 1 / t if parallel.sequence_parallel else 1
    h, m, a = shape.width, shape.mlp_dim, shape.num_heads
    if recompute == "full":
        return seq * b * h * e * f  # the checkpoint's input only
    dense = e * seq * b * (4 * h * f + 4 * h / t + 2 * m / t) + 16 * seq * b * f
    if profile.flash_attention:
        return dense + 4 * b * a * seq / t  # softmax log-sum-exp, fp32
    if recompute == "selective":
        return dense
    return dense + b * a * seq * seq / t * (4 if e == 4 else 4 + e)


def layer_backward_transient(shape: TransformerShape, seq: int, b: int,
                             parallel: ParallelConfig, e: int, profile: KernelProfile,
                             recompute: str) -> float:
    """Extra bytes alive while one layer runs backward: the larger of the attention
    gradients ([b, a, s, s] twice, unfused) and the MLP's ([s, b, m] twice); under full
    recomputation also the layer's re-materialised activations."""
    t = parallel.tensor
    h, m, a = shape.width, shape.mlp_dim, shape.num_heads
    mlp = 2 * seq * b * m / t * e
    attention = 0.0 if profile.flash_attention else 2 * b * a * seq * seq / t * 4
    extra = 0.0
    if recompute == "full":
        extra = layer_activations(shape, seq, b, parallel, e, profile, "none")
    return max(mlp, attention, 2 * seq * b * h * e) + extra


def _final_norm_saved(seq: int, b: int, width: int, e: float, f: float) -> float:
    """A stack's final LayerNorm keeps its input and two fp32 statistics per token (mean,
    rstd) for backward; f is the SP sequence fraction."""
    return seq * b * width * e * f + 8 * seq * b * f


def chunk_activations(plan: StagePlan, model: ModelConfig, geom: SequenceGeometry,
                      parallel: ParallelConfig, b: int, e: int, profile: KernelProfile,
                      recompute: str) -> tuple[dict[str, float], float]:
    """(bytes kept per micro-batch by component, the chunk's largest transient)."""
    vit, _ = model.vision.shape()
    dec = model.decoder.shape()
    t = parallel.tensor
    f = 1 / t if parallel.sequence_parallel else 1
    s_v, s_d, w, d = geom.vit_seq, geom.decoder_seq, vit.width, dec.width
    vocab = geom.padded_vocab / t
    parts: dict[str, float] = {}
    transient = 0.0
    if plan.has_embedding and e != 4:  # fp32 weights: the conv keeps the input batch itself
        parts["images"] = b * model.vision.in_channels * model.vision.image_size ** 2 * e
    if plan.num_vit_layers:
        per = layer_activations(vit, s_v, b, parallel, e, profile, recompute)
        parts["vit_layers"] = plan.num_vit_layers * per
        transient = max(transient, layer_backward_transient(vit, s_v, b, parallel, e, profile,
                                                            recompute))
    if plan.has_boundary:
        # The decoder reads the raw last-block output: the boundary keeps only the
        # projection's input (the token gather's backward needs indices, not values).
        parts["boundary"] = geom.num_kept * b * w * e
    if plan.num_decoder_layers:
        per = layer_activations(dec, s_d, b, parallel, e, profile, recompute)
        parts["decoder_layers"] = plan.num_decoder_layers * per
        transient = max(transient, layer_backward_transient(dec, s_d, b, parallel, e, profile,
                                                            recompute))
    if plan.has_head:
        logits = geom.text_len * b * vocab * 4  # fp32 [T, b, V/t]
        parts["head"] = (_final_norm_saved(s_d, b, d, e, f)  # decoder final norm input
                         + s_d * b * d * e  # its (gathered) output, the head's input
                         + logits)  # softmax kept by the vocab-parallel cross-entropy
        transient = max(transient, logits + geom.padded_vocab * d / t * e)
    return parts, transient


def chunk_output_bytes(plan: StagePlan, model: ModelConfig, geom: SequenceGeometry,
                       parallel: ParallelConfig, b: int, e: int) -> float:
    """The tensor a non-last chunk sends (kept by megatron until its backward)."""
    if plan.has_head:
        return 0.0
    f = 1 / parallel.tensor if parallel.sequence_parallel else 1
    if plan.has_boundary or plan.num_decoder_layers:
        return geom.decoder_seq * b * model.decoder.shape().width * e * f
    return geom.vit_seq * b * model.vision.shape()[0].width * e * f


def in_flight_micro_batches(pipeline_rank: int, parallel: ParallelConfig,
                            micro_batches: int) -> int:
    """Micro-batches (chunk-micro-batches when interleaved) whose activations coexist."""
    p, v = parallel.pipeline, parallel.virtual_pipeline or 1
    if p == 1:
        return 1
    if v == 1:
        return min(p - pipeline_rank, micro_batches)
    warmup = (p - pipeline_rank - 1) * 2 + (v - 1) * p
    return min(warmup + 1, micro_batches * v)


# --- the whole rank -----------------------------------------------------------------------

def rank_memory(model: ModelConfig, parallel: ParallelConfig, geom: SequenceGeometry,
                step: StepShape, pipeline_rank: int = 0,
                profile: KernelProfile = PROFILES["gpu_te"]) -> RankMemory:
    e = BYTES[step.precision]
    b, t = step.micro_batch, parallel.tensor
    plans = stage_plans(model, parallel, geom)
    v = parallel.virtual_pipeline or 1
    mine = [plans[chunk_index(pipeline_rank, vp, parallel.pipeline)] for vp in range(v)]
    n = sum(chunk_parameters(plan, model, geom, t) for plan in mine)
    shard = n / step.data_parallel if step.distributed_optimizer else n
    master = 4 if step.precision == "bf16" else 0
    optimizer = shard * (8 + master)
    kept, transient, outputs = {}, 0.0, 0.0
    for plan in mine:
        parts, chunk_transient = chunk_activations(plan, model, geom, parallel, b, e, profile,
                                                   step.recompute)
        for key, value in parts.items():
            kept[key] = kept.get(key, 0.0) + value / v  # interleaved: mean over chunks
        transient = max(transient, chunk_transient)
        outputs += chunk_output_bytes(plan, model, geom, parallel, b, e) / v
    in_flight = in_flight_micro_batches(pipeline_rank, parallel, step.micro_batches)
    activations = in_flight * (sum(kept.values()) + outputs)
    optimizer_transient = shard * 4 if profile.foreach_optimizer else 0.0
    if profile.collective_copies:
        optimizer_transient = max(optimizer_transient, n * 4.0, n * e)
    vit, _ = model.vision.shape()
    dec = model.decoder.shape()
    buffers = 0.0
    if parallel.sequence_parallel:  # megatron's global all-gather buffer, kept once grown
        widths = [geom.vit_seq * vit.width] * any(p.num_vit_layers for p in mine)
        widths += [geom.decoder_seq * dec.width] * any(p.num_decoder_layers for p in mine)
        buffers = max(widths, default=0) * b * e
    L = model.decoder.caption_length
    inputs = step.micro_batches * b * (model.vision.in_channels * model.vision.image_size ** 2
                                       * 4 + (L + geom.num_kept) * 8)
    return RankMemory(pipeline_rank, n, n * e, n * 4.0, optimizer, inputs, activations,
                      transient, optimizer_transient, buffers, in_flight, kept)


def max_rank_memory(model: ModelConfig, parallel: ParallelConfig, geom: SequenceGeometry,
                    step: StepShape, profile: KernelProfile = PROFILES["gpu_te"]) -> RankMemory:
    """The pipeline rank with the highest predicted peak (the one that must fit)."""
    return max((rank_memory(model, parallel, geom, step, r, profile)
                for r in range(parallel.pipeline)), key=lambda m: m.peak)
