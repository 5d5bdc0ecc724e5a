"""Rank the parallel layouts of a run on a cluster: which fit, and which step fastest.

For every TP x SP x PP x VPP x DP x micro-batch x recompute combination that divides the
model and the batch, the memory model (memory_model.py) gives the peak of the fullest
pipeline rank and this module a step time, from four analytic parts:

  compute     per layer and micro-batch, kernel_time.layer_seconds: GEMMs at the GPU
              generation's size-dependent efficiency, fused attention, elementwise traffic
              (hardware.py holds the calibrated constants, docs/benchmarks/
              planner_vs_published.md the runs they are checked against), with recomputation,
              and no layer faster than a fixed launch floor
  bubble      1F1B fill and drain: (PP - 1) / VPP x the mean per-micro-batch stage time
  TP comm     per layer and micro-batch 4 all-reduces of [s, b, h] (6 under full recompute;
              SP's all-gather + reduce-scatter move the same bytes), NCCL alpha-beta cost
              (collectives.py), on the critical path (no TP overlap here)
  PP comm     each micro-batch sends its boundary activation forward and its gradient back
  DP comm     distributed optimizer: reduce-scatter of fp32 gradients and all-gather of the
              weights. overlap_grad_reduce (on by default, as training sets it on GPU) hides
              the reduce-scatter under the last micro-batch's backward, overlap_param_gather
              the all-gather under the next step's first forward; the last bucket stays exposed
  optimizer   Adam over the rank's shard, memory-bound: ~34 bytes per parameter

Beside each step time, the input it needs (input_demand): images/s per node = global batch /
step / nodes, and the CPU cores that takes at a stated decode + augment rate per core (or the
images/s per GPU decoder). A layout whose node cannot supply it is flagged INPUT-BOUND; its
step time is then the input's, not the one above.

Bandwidth: intra-node (NVLink) when a group's ranks share a node, else the per-GPU network
bandwidth. Ranks are placed TP fastest, then DP, then PP (megatron's default order).
Not modelled: the data wait of a layout its node can feed (prefetching hides it), stragglers,
power limits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ov2_megatron.config import ModelConfig, ParallelConfig, validate_model
from ov2_megatron.models.flops import model_flops_per_sample
from ov2_megatron.parallel.pipeline_split import chunk_index, layer_flops
from ov2_megatron.perf import collectives, kernel_time, memory_model
from ov2_megatron.perf.hardware import Accelerator
from ov2_megatron.perf.kernel_time import LayerShape

GiB = 2**30


@dataclass(frozen=True)
class Assumptions:
    stack: str = "megatron_te"
    """Layer implementation the kernel-time model counts (kernel_time.STACKS)."""
    overlap_grad_reduce: bool = True
    """Gradient reduce-scatter overlapped with the last micro-batch's backward (GPU default)."""
    overlap_param_gather: bool = True
    """Weight all-gather overlapped with the next step's first forward (GPU default)."""
    layer_floor_s: float = 60e-6
    """Least time of one layer's forward + backward (~40 kernel launches)."""
    memory_reserve_gib: float = 3.0
    """Taken off the device memory before anything: CUDA context, NCCL, cuBLAS workspaces."""
    fragmentation: float = 0.08
    """Share of the rest lost to the caching allocator's fragmentation."""
    profile: str = "gpu_te"
    """Kernel profile of the memory model (memory_model.PROFILES)."""
    precision: str = "bf16"

    def usable_bytes(self, gpu: Accelerator) -> float:
        return (gpu.memory_gib - self.memory_reserve_gib) * (1 - self.fragmentation) * GiB


@dataclass
class StepTime:
    compute: float
    bubble: float
    tp_comm: float
    pp_comm: float
    dp_exposed: float
    optimizer: float

    @property
    def total(self) -> float:
        return (self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_exposed
                + self.optimizer)


@dataclass
class LayoutPlan:
    parallel: ParallelConfig
    data_parallel: int
    micro_batch: int
    micro_batches: int
    recompute: str
    memory: memory_model.RankMemory
    time: StepTime
    fits: bool
    mfu: float
    images_per_s: float

    @property
    def gpus(self) -> int:
        return self.parallel.tensor * self.parallel.pipeline * self.data_parallel


# --- input demand ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSupply:
    """What one node can decode and augment; the CPU rates are measured here (issue 16)."""
    cpu_cores_per_node: int = 112
    """DGX H100 / H200: 2 x 56-core Xeon Platinum 8480C (hyperthreads not counted: a second
    thread on a core adds little to JPEG decoding)."""
    decode_rate_per_core: float = 460.0
    """Images per core-second of DALI CPU decode + random-resized-crop + flip + jitter of
    photo-like 400-640 px JPEGs (450-470 measured on this project's 2-core machine; plain PIL
    decode alone ~950). A stage-1 resized copy of the shards decodes faster: measure it with
    tools/bench_data.py and pass that rate."""
    cores_per_gpu_process: int = 1
    """Cores each GPU's training process keeps (Python step loop, kernel launches, NCCL)."""
    gpu_decode_rate: float | None = None
    """Images/s one GPU's decoders supply (DALI "mixed": nvJPEG + hardware JPEG engines).
    None: no rate is stated, and the flag judges the CPU path. Not measured here yet
    (tools/gpu_check.sh will); a stated rate replaces the CPU path in the flag."""

    def free_cores(self, gpus_on_node: int) -> int:
        return max(self.cpu_cores_per_node - self.cores_per_gpu_process * gpus_on_node, 0)

    def describe(self, gpus_per_node: int) -> str:
        gpu = (f"{self.gpu_decode_rate:,.0f} img/s per GPU decoder (stated)"
               if self.gpu_decode_rate else "GPU decoding: no rate stated (not measured here)")
        return (f"input: {self.cpu_cores_per_node} CPU cores/node, "
                f"{self.free_cores(gpus_per_node)} free after {self.cores_per_gpu_process} per "
                f"GPU process; CPU decode + augment {self.decode_rate_per_core:g} img/s per core;"
                f" {gpu}")


@dataclass
class InputDemand:
    per_node: float
    """Images/s the busiest node must decode and augment to keep up with the step time."""
    per_gpu: float
    """Images/s per decoding rank (replica reader) on that node."""
    cores: float
    """CPU cores per node that takes at InputSupply.decode_rate_per_core."""
    bound: bool
    """The node cannot supply it: its free cores (or, with a stated rate, its GPU decoders)."""
    supplied_per_node: float
    """Images/s the node can supply by the path the flag judges."""


def input_demand(p: LayoutPlan, gpus_per_node: int, supply: InputSupply) -> InputDemand:
    """The busiest node's input. One rank per replica decodes (TP rank 0 of pipeline stage 0:
    training/replica_input.py), and megatron orders ranks with the pipeline stage outermost,
    so stage 0 fills the first world/PP ranks: a node there holds gpus_on_node / TP readers,
    each decoding its replica's global batch / DP. Without pipelining that is the global batch
    spread over the nodes; with PP stages on separate nodes, PP times that on stage-0 nodes
    (their CPU cores, or GPU decoders, do all the decoding; the other nodes none)."""
    gpus_on_node = min(p.gpus, gpus_per_node)
    stage0_on_node = min(gpus_on_node, p.gpus // p.parallel.pipeline)
    readers = max(1, stage0_on_node // p.parallel.tensor)
    per_node = p.images_per_s / p.data_parallel * readers
    if supply.gpu_decode_rate:
        supplied = supply.gpu_decode_rate * readers
    else:
        supplied = supply.free_cores(gpus_on_node) * supply.decode_rate_per_core
    return InputDemand(per_node, per_node / readers, per_node / supply.decode_rate_per_core,
                       per_node > supplied, supplied)


# --- per-rank work --------------------------------------------------------------------------

def _chunk_time(plan, model: ModelConfig, geom, recompute: str, micro_batch: int, tp: int,
                gpu: Accelerator, assume: Assumptions) -> float:
    """Seconds of one chunk's forward + backward (+ recompute) for one micro-batch."""
    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    stack = kernel_time.STACKS[assume.stack]
    total = 0.0
    for count, shape, seq in ((plan.num_vit_layers, vit, geom.vit_seq),
                              (plan.num_decoder_layers, dec, geom.decoder_seq)):
        if count:
            layer = LayerShape(shape.width, shape.mlp_dim, shape.num_heads, shape.num_heads,
                               seq)
            total += count * kernel_time.layer_seconds(layer, micro_batch, tp, gpu, stack,
                                                       recompute, floor_s=assume.layer_floor_s)
    if plan.has_embedding:  # the patch conv: forward + dW only
        pixels = model.vision.in_channels * patch ** 2
        total += 2 * kernel_time.gemm_seconds(geom.num_patches * micro_batch, vit.width,
                                              pixels, gpu)
    if plan.has_boundary:
        total += 3 * kernel_time.gemm_seconds(geom.num_kept * micro_batch, dec.width,
                                              vit.width, gpu)
    if plan.has_head:
        total += kernel_time.head_seconds(geom.text_len * micro_batch, dec.width,
                                          geom.padded_vocab, tp, gpu)
    return total


def _dp_exposed(params: float, dp: int, tp: int, e: int, gpu: Accelerator,
                assume: Assumptions, first_forward: float, last_backward: float) -> float:
    """Exposed seconds of the gradient reduce-scatter and the weight all-gather."""
    if dp <= 1:
        return 0.0
    g = collectives.group(dp, tp, gpu)
    bucket = min(params, max(40e6, 1e6 * dp))  # megatron's default DDP bucket size
    reduce = collectives.reduce_scatter(params * 4, g, gpu)
    gather = collectives.all_gather(params * e, g, gpu)
    if assume.overlap_grad_reduce:
        reduce = max(collectives.reduce_scatter(bucket * 4, g, gpu), reduce - last_backward)
    if assume.overlap_param_gather:
        gather = max(collectives.all_gather(bucket * e, g, gpu), gather - first_forward)
    return reduce + gather


def step_time(model: ModelConfig, parallel: ParallelConfig, geom, dp: int, micro_batch: int,
              micro_batches: int, recompute: str, gpu: Accelerator,
              assume: Assumptions) -> StepTime:
    t, p, v = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline or 1
    e = memory_model.BYTES[assume.precision]
    vit, _ = model.vision.shape()
    dec = model.decoder.shape()
    tp_group = collectives.group(t, 1, gpu)
    pp_same_node = t * dp * p <= gpu.gpus_per_node
    per_layer = 6 if recompute == "full" else 4
    plans = memory_model.stage_plans(model, parallel, geom)
    per_rank, params = [], 0
    for rank in range(p):
        mine = [plans[chunk_index(rank, vp, p)] for vp in range(v)]
        params = max(params, sum(memory_model.chunk_parameters(c, model, geom, t) for c in mine))
        compute = sum(_chunk_time(c, model, geom, recompute, micro_batch, t, gpu, assume)
                      for c in mine)
        tp = per_layer * sum(
            c.num_vit_layers * collectives.all_reduce(geom.vit_seq * vit.width * micro_batch
                                                      * e, tp_group, gpu)
            + c.num_decoder_layers * collectives.all_reduce(
                geom.decoder_seq * dec.width * micro_batch * e, tp_group, gpu)
            for c in mine)
        sent = [memory_model.chunk_output_bytes(c, model, geom, parallel, micro_batch, e)
                for c in mine]
        pp = 2 * sum(collectives.send(b, pp_same_node, gpu) for b in sent) if p > 1 else 0.0
        per_rank.append((compute, tp, pp))
    slowest = max(per_rank, key=sum)
    mean_stage = sum(sum(r) for r in per_rank) / p
    dp_exposed = _dp_exposed(params, dp, t, e, gpu, assume, first_forward=slowest[0] / 3,
                             last_backward=slowest[0] * 2 / 3)
    return StepTime(
        compute=micro_batches * slowest[0], bubble=(p - 1) / v * mean_stage,
        tp_comm=micro_batches * slowest[1], pp_comm=micro_batches * slowest[2],
        dp_exposed=dp_exposed, optimizer=params / dp * 34 / gpu.elementwise_bandwidth)


# --- enumeration ----------------------------------------------------------------------------

def _powers_of_two(limit: int) -> list[int]:
    out, value = [], 1
    while value <= limit:
        out.append(value)
        value *= 2
    return out


def candidate_parallel(model: ModelConfig, gpus: int, gpus_per_node: int):
    vit, _ = model.vision.shape()
    depth = vit.depth + model.decoder.shape().depth
    for tp in _powers_of_two(gpus_per_node):
        for sp in ([False, True] if tp > 1 else [False]):
            for pp in _powers_of_two(depth):
                if gpus % (tp * pp):
                    continue
                for vpp in ([None, 2] if pp > 1 else [None]):
                    if pp * (vpp or 1) > depth:
                        continue
                    yield ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp,
                                         sequence_parallel=sp)


def plan(model: ModelConfig, global_batch: int, gpus: int, gpu: Accelerator,
         assume: Assumptions = Assumptions(), recomputes=("none", "selective", "full"),
         micro_batches_allowed=None) -> list[LayoutPlan]:
    """Every valid layout, best first: those that fit by predicted step time, then the rest
    by memory."""
    profile = memory_model.PROFILES[assume.profile]
    if profile.flash_attention:  # selective recompute only drops the unfused [b,a,s,s] tensors
        recomputes = [r for r in recomputes if r != "selective"]
    flops = model_flops_per_sample(model, validate_model(model, ParallelConfig()))
    results = []
    for parallel in candidate_parallel(model, gpus, gpu.gpus_per_node):
        try:
            geom = validate_model(model, parallel)
        except ValueError:
            continue  # heads / MLP / vocabulary not divisible by this TP
        dp = gpus // (parallel.tensor * parallel.pipeline)
        if global_batch % dp:
            continue
        per_replica = global_batch // dp
        for micro_batch in _powers_of_two(min(per_replica, 1024)):
            if per_replica % micro_batch:
                continue
            micro_batches = per_replica // micro_batch
            if micro_batches_allowed and micro_batch not in micro_batches_allowed:
                continue
            if parallel.virtual_pipeline and micro_batches % parallel.pipeline:
                continue
            for recompute in recomputes:
                results.append(_evaluate(model, parallel, geom, dp, micro_batch, micro_batches,
                                         recompute, gpu, assume, profile, flops, global_batch,
                                         gpus))
    fitting = sorted((r for r in results if r.fits), key=lambda r: (r.time.total, r.memory.peak))
    rest = sorted((r for r in results if not r.fits), key=lambda r: r.memory.peak)
    return fitting + rest


def _evaluate(model, parallel, geom, dp, micro_batch, micro_batches, recompute, gpu, assume,
              profile, flops, global_batch, gpus) -> LayoutPlan:
    step = memory_model.StepShape(micro_batch, micro_batches, dp, assume.precision, recompute)
    memory = memory_model.max_rank_memory(model, parallel, geom, step, profile)
    time = step_time(model, parallel, geom, dp, micro_batch, micro_batches, recompute, gpu,
                     assume)
    total = time.total
    return LayoutPlan(parallel, dp, micro_batch, micro_batches, recompute, memory, time,
                      fits=memory.peak <= assume.usable_bytes(gpu),
                      mfu=flops * global_batch / (total * gpus * gpu.bf16_flops),
                      images_per_s=global_batch / total)


def model_for(variant: str, resolution: int, keep_ratio: float = 0.35, decoder: str = "L",
              caption_length: int = 128, vocab_size: int = 32000) -> ModelConfig:
    from ov2_megatron.config import DecoderConfig, VisionConfig

    return ModelConfig(vision=VisionConfig(variant=variant, image_size=resolution,
                                           keep_ratio=keep_ratio),
                       decoder=DecoderConfig(variant=decoder, caption_length=caption_length,
                                             vocab_size=vocab_size),
                       transformer_impl="transformer_engine")


# --- report ---------------------------------------------------------------------------------

def format_table(plans: list[LayoutPlan], gpu: Accelerator, assume: Assumptions, top: int,
                 header: str, supply: InputSupply = InputSupply()) -> str:
    fits = [p for p in plans if p.fits]
    usable = assume.usable_bytes(gpu) / GiB
    lines = [header,
             f"assumed: {gpu.name}, dense bf16 peak {gpu.bf16_flops / 1e12:.0f} TFLOP/s at "
             f"{gpu.gemm_efficiency:.0%} large-GEMM efficiency ({assume.stack}); NVLink "
             f"{gpu.intra_node_bandwidth / 1e9:.0f} GB/s, network "
             f"{gpu.inter_node_bandwidth / 1e9:.0f} GB/s per GPU (achievable bus bandwidth), "
             f"{gpu.gpus_per_node} GPUs/node; usable memory {usable:.1f} of "
             f"{gpu.memory_gib:.1f} GiB ({assume.memory_reserve_gib:g} GiB reserved, "
             f"{assume.fragmentation:.0%} fragmentation); {assume.precision}, memory profile "
             f"{assume.profile}",
             supply.describe(gpu.gpus_per_node),
             f"{len(plans)} layouts considered, {len(fits)} fit; best {min(top, len(fits))} "
             "by predicted step time:", ""]
    cols = ("#", "TP", "SP", "PP", "VPP", "DP", "recomp", "mb", "m", "mem GiB", "w+g+opt",
            "act", "step s", "img/s", "MFU", "bubble", "TP comm", "DP exp.", "img/s/node",
            "cores", "input")
    rows = []
    for i, p in enumerate(fits[:top], 1):
        par, t, m = p.parallel, p.time, p.memory
        need = input_demand(p, gpu.gpus_per_node, supply)
        rows.append((str(i), str(par.tensor), "y" if par.sequence_parallel else "-",
                     str(par.pipeline), str(par.virtual_pipeline or "-"), str(p.data_parallel),
                     p.recompute, str(p.micro_batch), str(p.micro_batches),
                     f"{m.peak / GiB:.1f}", f"{m.static / GiB:.1f}",
                     f"{(m.activations + m.transient) / GiB:.1f}", f"{t.total:.3f}",
                     f"{p.images_per_s:,.0f}", f"{p.mfu:.1%}", f"{t.bubble / t.total:.0%}",
                     f"{t.tp_comm / t.total:.0%}", f"{t.dp_exposed / t.total:.0%}",
                     f"{need.per_node:,.0f}", f"{need.cores:.0f}",
                     "INPUT-BOUND" if need.bound else "ok"))
    lines += _aligned(cols, rows)
    if not fits and plans:
        smallest = min(plans, key=lambda p: p.memory.peak)
        lines.append(f"nothing fits: the smallest layout needs {smallest.memory.peak / GiB:.1f} "
                     f"GiB per GPU (TP{smallest.parallel.tensor} PP{smallest.parallel.pipeline}"
                     f" mb {smallest.micro_batch} {smallest.recompute}); add GPUs or memory")
    lines.append("")
    lines.append("mem = predicted peak of the fullest pipeline rank (w+g+opt: weights, fp32 "
                 "grads, distributed-optimizer shard; act: activations + transients); "
                 "MFU = model FLOPs / (step x GPUs x peak); img/s/node = global batch / step "
                 "/ nodes, cores = the CPU cores that takes at the stated decode rate, "
                 "INPUT-BOUND: the node cannot supply it")
    if fits:
        lines.append(input_summary(fits[0], gpu.gpus_per_node, supply))
    return "\n".join(lines)


def input_summary(p: LayoutPlan, gpus_per_node: int, supply: InputSupply) -> str:
    """One sentence on the best layout's input: what it needs, what the node supplies, and
    the step time the input allows when it cannot keep up."""
    need = input_demand(p, gpus_per_node, supply)
    path = "GPU decoders" if supply.gpu_decode_rate else "free CPU cores"
    text = (f"input of layout 1: {need.per_node:,.0f} img/s per node ({need.per_gpu:,.0f} per "
            f"GPU) = {need.cores:.0f} cores at {supply.decode_rate_per_core:g} img/s/core; "
            f"the node's {path} supply {need.supplied_per_node:,.0f} img/s")
    if not need.bound:
        return text + ": ok"
    input_step = p.time.total * need.per_node / max(need.supplied_per_node, 1e-9)
    fixes = ("decode smaller JPEGs (a stage-1 resized copy of the shards) or add CPU threads "
             "beside the GPU decoders" if supply.gpu_decode_rate else
             "decode smaller JPEGs (a stage-1 resized copy of the shards), decode on the GPU "
             "(DALI mixed) or take nodes with more cores")
    return (text + f": INPUT-BOUND, the step would take >= {input_step:.3f} s (MFU <= "
            f"{p.mfu * p.time.total / input_step:.1%}); {fixes}")


def _aligned(cols: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """The header and rows, each column right-aligned to its widest cell."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    return ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [cols, *rows]]


def as_dict(p: LayoutPlan, gpus_per_node: int, supply: InputSupply = InputSupply()) -> dict:
    return dict(input=dataclasses.asdict(input_demand(p, gpus_per_node, supply)),parallel=dataclasses.asdict(p.parallel), dp=p.data_parallel,
                micro_batch=p.micro_batch, micro_batches=p.micro_batches,
                recompute=p.recompute, fits=p.fits, peak_gib=p.memory.peak / GiB,
                static_gib=p.memory.static / GiB, step_s=p.time.total,
                images_per_s=p.images_per_s, mfu=p.mfu,
                time=dataclasses.asdict(p.time))



# --- input-rate table (tools/plan.py --input-table) ----------------------------------------

def best_with_layout(plans: list[LayoutPlan], parallel: ParallelConfig) -> LayoutPlan | None:
    """The fastest fitting plan with the TP / SP / PP / VPP of `parallel` (a recipe's layout);
    micro-batch and recompute are the planner's choice, as the recipe's own micro-batch need
    not divide the per-replica batch at another GPU count."""
    def key(par):
        return par.tensor, par.sequence_parallel, par.pipeline, par.virtual_pipeline or 1
    return next((p for p in plans if p.fits and key(p.parallel) == key(parallel)), None)


@dataclass
class InputRow:
    recipe: str
    stage: int
    resolution: int
    global_batch: int
    gpus: int
    plan: LayoutPlan | None
    """None: no layout of the recipe's TP/PP fits at this GPU count."""


def format_input_table(rows: list[InputRow], gpu: Accelerator, supply: InputSupply) -> str:
    cols = ("recipe", "stage", "px", "batch", "GPUs", "nodes", "layout", "step s", "img/s",
            "MFU", "img/s/node", "img/s/GPU", "cores/node", "input")
    table = []
    for r in rows:
        nodes = -(-r.gpus // gpu.gpus_per_node)
        head = (r.recipe, str(r.stage), str(r.resolution), f"{r.global_batch:,}", str(r.gpus),
                str(nodes))
        if r.plan is None:
            table.append(head + ("no layout fits",) + ("-",) * (len(cols) - len(head) - 1))
            continue
        p, need = r.plan, input_demand(r.plan, gpu.gpus_per_node, supply)
        par = p.parallel
        layout = (f"TP{par.tensor}{'+SP' if par.sequence_parallel else ''} PP{par.pipeline} "
                  f"DP{p.data_parallel} mb{p.micro_batch} {p.recompute}")
        table.append(head + (layout, f"{p.time.total:.3f}", f"{p.images_per_s:,.0f}",
                             f"{p.mfu:.1%}", f"{need.per_node:,.0f}", f"{need.per_gpu:,.0f}",
                             f"{need.cores:.0f}", "INPUT-BOUND" if need.bound else "ok"))
    lines = [f"input rate of the recipes' layouts on {gpu.name} ({gpu.gpus_per_node} GPUs/node;"
             f" predicted step times, tools/plan.py)", supply.describe(gpu.gpus_per_node), "",
             *_aligned(cols, table)]
    lines += ["", "layout: the recipe's TP/SP/PP with the planner's fastest fitting micro-batch "
              "and recompute; img/s/node = global batch / step / nodes; cores/node = the CPU "
              f"cores that takes at {supply.decode_rate_per_core:g} img/s/core; INPUT-BOUND: "
              "the node's free cores (or stated GPU decoders) supply less"]
    return "\n".join(lines)
