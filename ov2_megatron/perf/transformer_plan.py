"""Step time of plain transformer workloads for one given layout: ViT classifiers, CLIP
two-towers and decoder-only GPTs (tools/plan.py --model vit|clip|gpt).

The same kernel and collective models as the OpenVision 2 planner (kernel_time.py,
collectives.py); the layout is given, not searched. Per micro-batch and pipeline stage:

  compute    every tower's layers / PP (even split) + the LM head on the last stage
  TP comm    per layer 4 all-reduces of [s, b, h] (6 under full recompute); with sequence
             parallelism the all-gather + reduce-scatter pair moves the same bytes
  PP comm    the stage-boundary activation, sent forward and its gradient back, per chunk
  bubble     (PP - 1) / VPP x the per-micro-batch stage time (1F1B, interleaved when VPP > 1)
  DP         distributed optimizer: reduce-scatter of the gradients and all-gather of the
             weights; with overlap_grad_reduce the reduce-scatter runs under the last
             micro-batch's backward, with overlap_param_gather the all-gather under the next
             step's first forward; either way the last bucket (megatron's default
             max(40M, 1M x DP) parameters) stays exposed. Without the distributed optimizer
             (DDP) one all-reduce.
  optimizer  Adam over the rank's shard, memory-bound: ~34 bytes per parameter
MFU counts model FLOPs only (3 x forward, full s^2 attention, no recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ov2_megatron.perf import collectives, kernel_time
from ov2_megatron.perf.hardware import Accelerator
from ov2_megatron.perf.kernel_time import LayerShape

ADAM_BYTES_PER_PARAM = 34  # bf16 w + fp32 grad/master/m/v read and written by a fused Adam


@dataclass(frozen=True)
class Tower:
    layers: int
    shape: LayerShape


@dataclass(frozen=True)
class Workload:
    """What one sample runs: one or more towers, an optional LM head, its throughput unit."""

    name: str
    towers: tuple[Tower, ...]
    unit: str
    """'images' or 'tokens': what throughput counts."""
    units_per_sample: int = 1
    vocab: int = 0
    """LM head width (0: none, e.g. a classifier or CLIP, whose heads are negligible)."""
    embed_flops: float = 0.0
    """Forward FLOPs of the patch embedding per sample (its backward is dW only: 2x)."""

    def parameters(self) -> float:
        count = self.vocab * self.towers[-1].shape.hidden if self.vocab else 0.0
        for t in self.towers:
            s = t.shape
            attention = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.hidden ** 2
            mlp = s.hidden * s.ffn * (3 if s.gated else 2)
            count += t.layers * (attention + mlp)
        return count

    def model_flops_per_sample(self) -> float:
        forward = sum(t.layers * (t.shape.linear_flops(t.shape.seq)
                                  + t.shape.attention_flops(1)) for t in self.towers)
        head = 2 * self.towers[-1].shape.seq * self.towers[-1].shape.hidden * self.vocab
        return 3 * (forward + head) + 2 * self.embed_flops


def vit(layers, hidden, heads, ffn, image_size, patch, prefix_tokens=1) -> Workload:
    seq = (image_size // patch) ** 2 + prefix_tokens
    shape = LayerShape(hidden, ffn, heads, heads, seq)
    embed = 2 * (seq - prefix_tokens) * 3 * patch * patch * hidden
    return Workload("vit", (Tower(layers, shape),), "images", embed_flops=embed)


def clip(image: Workload, text_layers, text_hidden, text_heads, text_ffn, text_len) -> Workload:
    text = Tower(text_layers, LayerShape(text_hidden, text_ffn, text_heads, text_heads,
                                         text_len, causal=True))
    return Workload("clip", image.towers + (text,), "images", embed_flops=image.embed_flops)


def gpt(layers, hidden, heads, ffn, seq, vocab, kv_heads=None, gated=False) -> Workload:
    shape = LayerShape(hidden, ffn, heads, kv_heads or heads, seq, gated=gated, causal=True)
    return Workload("gpt", (Tower(layers, shape),), "tokens", units_per_sample=seq,
                    vocab=vocab)


@dataclass(frozen=True)
class Layout:
    """How the job is cut: TP x PP x DP = gpus, micro-batches, recompute, DP overlap."""

    gpus: int
    global_batch: int
    micro_batch: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    recompute: str = "none"
    """none, selective or full."""
    recompute_layers: tuple[int, ...] | None = None
    """Layers per tower under full recompute (megatron's 'block' method); None: all."""
    stack: str = "megatron_te"
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    grad_bytes: int = 4
    """Bytes per gradient element reduced (fp32: grad_reduce_in_fp32)."""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def validate(self, workload: Workload) -> None:
        if self.gpus % (self.tp * self.pp):
            raise ValueError(f"gpus {self.gpus} not divisible by tp x pp = {self.tp * self.pp}")
        if self.global_batch % (self.dp * self.micro_batch):
            raise ValueError(f"global batch {self.global_batch} not divisible by dp "
                             f"{self.dp} x micro batch {self.micro_batch}")
        for t in workload.towers:
            if t.shape.heads % self.tp or t.shape.ffn % self.tp:
                raise ValueError(f"heads {t.shape.heads} / ffn {t.shape.ffn} not divisible by "
                                 f"tp {self.tp}")


@dataclass
class Prediction:
    step_s: float
    throughput: float
    """Units (images or tokens) per second, whole job."""
    mfu: float
    parts: dict = field(default_factory=dict)

    @property
    def per_gpu(self) -> float:
        return self.throughput / self.parts["gpus"]


def _stage_seconds(workload: Workload, layout: Layout, gpu: Accelerator) -> tuple[float, float]:
    """(compute, TP communication) of the busiest stage for one micro-batch."""
    stack = kernel_time.STACKS[layout.stack]
    tp_group = collectives.group(layout.tp, 1, gpu)
    compute = tp = 0.0
    for i, tower in enumerate(workload.towers):
        redone = tower.layers
        if layout.recompute_layers is not None:
            redone = layout.recompute_layers[i]
        kinds = [(redone, layout.recompute), (tower.layers - redone, "none")]
        for count, recompute in kinds:
            layer = kernel_time.layer_seconds(tower.shape, layout.micro_batch, layout.tp, gpu,
                                              stack, recompute, layout.sequence_parallel)
            compute += count * layer / layout.pp
            collectives_per_layer = 6 if recompute == "full" else 4
            nbytes = tower.shape.seq * layout.micro_batch * tower.shape.hidden * 2
            tp += (count / layout.pp * collectives_per_layer
                   * collectives.all_reduce(nbytes, tp_group, gpu))
    if workload.vocab:
        last = workload.towers[-1].shape
        compute += kernel_time.head_seconds(last.seq * layout.micro_batch, last.hidden,
                                            workload.vocab, layout.tp, gpu)
    return compute, tp


def _data_parallel(workload: Workload, layout: Layout, gpu: Accelerator,
                   first_forward: float, last_backward: float) -> float:
    """Exposed seconds of the gradient reduction and the weight all-gather."""
    if layout.dp == 1:
        return 0.0
    params = workload.parameters() / (layout.tp * layout.pp)
    g = collectives.group(layout.dp, layout.tp, gpu)
    bucket = max(40e6, 1e6 * layout.dp)
    grads = params * layout.grad_bytes
    if not layout.distributed_optimizer:
        reduce = collectives.all_reduce(grads, g, gpu)
        tail = collectives.all_reduce(min(bucket, params) * layout.grad_bytes, g, gpu)
        return max(tail, reduce - last_backward) if layout.overlap_grad_reduce else reduce
    reduce = collectives.reduce_scatter(grads, g, gpu)
    gather = collectives.all_gather(params * 2, g, gpu)
    tail_rs = collectives.reduce_scatter(min(bucket, params) * layout.grad_bytes, g, gpu)
    tail_ag = collectives.all_gather(min(bucket, params) * 2, g, gpu)
    exposed = max(tail_rs, reduce - last_backward) if layout.overlap_grad_reduce else reduce
    exposed += max(tail_ag, gather - first_forward) if layout.overlap_param_gather else gather
    return exposed


def predict(workload: Workload, layout: Layout, gpu: Accelerator) -> Prediction:
    layout.validate(workload)
    micro_batches = layout.global_batch // (layout.dp * layout.micro_batch)
    compute, tp = _stage_seconds(workload, layout, gpu)
    pp = 0.0
    if layout.pp > 1:
        last = workload.towers[-1].shape
        shard = layout.tp if layout.sequence_parallel else 1
        boundary = last.seq * layout.micro_batch * last.hidden * 2 / shard
        same_node = layout.tp * layout.dp * layout.pp <= gpu.gpus_per_node
        pp = 2 * layout.vpp * collectives.send(boundary, same_node, gpu)
    per_micro = compute + tp + pp
    bubble = (layout.pp - 1) / layout.vpp * per_micro
    dp = _data_parallel(workload, layout, gpu, first_forward=compute / 3,
                        last_backward=compute * 2 / 3)
    shard = workload.parameters() / (layout.tp * layout.pp)
    shard /= layout.dp if layout.distributed_optimizer else 1
    optimizer = shard * ADAM_BYTES_PER_PARAM / gpu.elementwise_bandwidth
    step = micro_batches * per_micro + bubble + dp + optimizer
    samples_per_s = layout.global_batch / step
    mfu = (workload.model_flops_per_sample() * samples_per_s
           / (layout.gpus * gpu.bf16_flops))
    parts = dict(gpus=layout.gpus, micro_batches=micro_batches,
                 compute=micro_batches * compute, tp_comm=micro_batches * tp,
                 pp_comm=micro_batches * pp, bubble=bubble, dp_exposed=dp,
                 optimizer=optimizer)
    return Prediction(step, samples_per_s * workload.units_per_sample, mfu, parts)
