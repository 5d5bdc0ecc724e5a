"""Benchmark the real training step: warm-up + timed steps of `loop.train_step` on the
model, DDP and distributed optimizer that `loop.build_model_and_optimizer` builds.

    result = run_benchmark(run, steps=10, warmup=2)   # inside an initialised world

What is measured, and how (also written into the result):
  step time        wall time of data + train_step, synchronised (CUDA) at both ends; median
  data wait        producing the step's micro-batches: with synthetic data the token-drop
                   index draw (images and captions are drawn once, in memory); with
                   data="loader" the real DALI loader through BatchStream, on
                   data.train_shards when given, else on the synthetic set (settle_data)
  optimizer        megatron's optimizer.step (grad-norm, clip, Adam, param all-gather),
                   timed by wrapping that one bound method
  forward-backward the rest of train_step: the pipeline schedule incl. grad reduction
  exposed comm     part of the two above: host time blocked in collectives (CPU/gloo), or
                   NCCL kernel time not overlapped by compute in one profiled step (CUDA)
  memory           peak above the pre-model baseline (perf/peak_memory.py), max over ranks,
                   next to the memory model's prediction for the same layout; with
                   data="loader" on CPU it includes the loader's host buffers (not modelled)
  FLOP/s, MFU      analytic model FLOPs (models/flops.py; recomputation not counted, HFU
                   counts it) against the device's dense bf16 peak; FP8 runs say so
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ov2_megatron.data.config import resolve_shard_spec
from ov2_megatron.models.flops import (PEAK_BF16, PEAK_FP8, model_flops_per_sample, peak_for,
                                       train_flops_per_sample)
from ov2_megatron.perf import memory_model
from ov2_megatron.perf.comm_timing import KINDS, BlockedTimer, exposed_from_kernels
from ov2_megatron.perf.peak_memory import PeakMemory

GiB = 2**30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_captions(batch: int, length: int, vocab: int, pad_id: int,
                       gen: torch.Generator) -> torch.Tensor:
    """[b, L] ids in [1, vocab) avoiding pad_id, with PAD tails of varying length (half to
    L - 1 of L is text; the last slot is always PAD), like tokenised captions."""
    tokens = torch.randint(1, vocab, (batch, length), generator=gen)
    tokens[tokens == pad_id] = (pad_id + 1) % vocab or 1
    lengths = torch.randint(length // 2, length, (batch,), generator=gen)
    tokens[torch.arange(length) >= lengths[:, None]] = pad_id
    return tokens


class SyntheticStream:
    """One replica's micro-batches, drawn once in memory; each step draws fresh token-drop
    indices for its global sample positions, as BatchStream does for loader batches."""

    def __init__(self, run, geom, micro_batches: int, dp_rank: int, device: torch.device):
        from megatron.core import parallel_state

        self.geom, self.seed, self.micro_batches = geom, run.train.seed, micro_batches
        self.micro_batch, self.dp_rank, self.device = run.train.micro_batch, dp_rank, device
        self.dp_size = parallel_state.get_data_parallel_world_size()
        gen = torch.Generator().manual_seed(run.train.seed + 7919 * dp_rank)
        size, dec = run.model.vision.image_size, run.model.decoder
        self.data = []
        for _ in range(micro_batches):
            images = torch.randn(self.micro_batch, run.model.vision.in_channels, size, size,
                                 generator=gen)
            tokens = synthetic_captions(self.micro_batch, dec.caption_length, dec.vocab_size,
                                        dec.pad_id, gen)
            self.data.append((images.to(device), tokens.to(device)))

    def step_batches(self, step: int):
        from ov2_megatron.models.token_drop import keep_indices
        from ov2_megatron.training.step import MicroBatch

        start = time.perf_counter()
        local = self.micro_batch * self.micro_batches
        base = step * local * self.dp_size + self.dp_rank * local
        batches = []
        for i, (images, tokens) in enumerate(self.data):
            index = torch.arange(base + i * self.micro_batch, base + (i + 1) * self.micro_batch)
            keep = keep_indices(index, self.geom.num_patches, self.geom.num_kept, self.seed)
            batches.append(MicroBatch(images, tokens, keep.to(self.device, non_blocking=True)))
        return batches, time.perf_counter() - start


def settle_data(run, data: str | None, world: int) -> tuple[str, str]:
    """(what feeds the steps, a sentence saying which data that is), settled in `run` as a
    training run settles it (data_sources.choose_sources) and checked before any process
    group: a bad shard path or tokenizer is a ValueError / OSError naming it, not a crash
    mid-benchmark. `data` None: the loader when data.train_shards names shards, otherwise
    the in-memory synthetic batches."""
    from ov2_megatron.parallel.initialize import ParallelLayout
    from ov2_megatron.training import data_sources

    shards = run.data.train_shards
    own = data_sources.given(shards)
    data = data or ("loader" if own else "synthetic")
    if data == "synthetic":
        unread = "; data.train_shards is not read (--data loader reads it)" if own else ""
        return data, ("synthetic batches drawn once in memory (random pixels and captions, "
                      f"no loader, no decoding){unread}")
    if data != "loader":
        raise ValueError(f"--data {data!r}: use synthetic or loader")
    listed = len(resolve_shard_spec(shards)) if own else 0
    data_sources.choose_sources(run)  # own shards: the synthetic set is not built
    if run.synthetic:
        return data, (f"the DALI loader on the synthetic set ({run.synthetic.get('num_train')} "
                      f"images at {run.synthetic.get('image_size')} px, built on first use "
                      "under $OV2_CACHE; --set data.train_shards=... measures your shards)")
    if not own:
        raise ValueError(f"--data loader: recipe {run.name} has no synthetic set and "
                         "data.train_shards is empty: --set data.train_shards=... (and "
                         "data.tokenizer_model=...)")
    p = run.parallel
    data_sources.check_data(run, ParallelLayout(p.tensor, p.pipeline).data_parallel_size(world))
    read = len(resolve_shard_spec(run.data.train_shards))
    held = "; the last is held out for validation, as a run does" if read < listed else ""
    return data, (f"the DALI loader on data.train_shards {shards} ({read} "
                  f"shard{'s' if read != 1 else ''} read{held})")


def _loader_stream(run, geom, micro_batches, dp_rank, dp_size, device):
    from ov2_megatron.data.dali_pipeline import ImageCaptionLoader
    from ov2_megatron.training.replica_input import ReplicaInput, reads_data
    from ov2_megatron.training.step import BatchStream

    # As training reads: one loader per replica, its tensors shared (replica_input.py).
    loader = ImageCaptionLoader(run.data, dp_rank=dp_rank, dp_size=dp_size,
                                batch_size=run.train.micro_batch) if reads_data() else None
    shared = ReplicaInput((3, run.data.resolution, run.data.resolution),
                          run.data.caption_length, device)
    return BatchStream(loader, geom, run.train.seed, run.train.micro_batch, micro_batches,
                       dp_rank, device, shared)


def shallow_twin(run):
    """The run with one layer per pipeline chunk: the same layout, precision, shapes and
    micro-batch, so every kernel (and every oneDNN/MKL primitive for those shapes) runs."""
    import copy

    twin = copy.deepcopy(run)
    p = run.parallel
    twin.model.vision.depth = p.pipeline * (p.virtual_pipeline or 1)
    twin.model.decoder.depth = 1
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    dp = world // (p.tensor * p.pipeline)
    twin.train.global_batch = run.train.micro_batch * dp * p.pipeline
    return twin


def warm_libraries(run) -> None:
    """CPU: one step of `shallow_twin(run)` before the memory baseline, so that first-use
    costs that are not tensors (code pages, OpenMP/oneDNN state and primitive caches for these
    shapes, gloo buffers: 20-50 MiB here) are not charged to the run."""
    import gc

    from megatron.core import parallel_state

    from ov2_megatron.training.loop import build_model_and_optimizer, train_step
    from ov2_megatron.training.run_config import validate_run

    twin = shallow_twin(run)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    geom = validate_run(twin, world)
    dp = parallel_state.get_data_parallel_world_size()
    stream = SyntheticStream(twin, geom, twin.train.global_batch // (twin.train.micro_batch * dp),
                             parallel_state.get_data_parallel_rank(), torch.device("cpu"))
    model, optimizer, scheduler = build_model_and_optimizer(twin, geom)
    batches, _ = stream.step_batches(0)
    train_step(model, optimizer, scheduler, batches, geom, twin.train.micro_batch)
    del model, optimizer, scheduler, batches, stream
    gc.collect()


def memory_profile(impl: str) -> memory_model.KernelProfile:
    if not torch.cuda.is_available():
        return memory_model.PROFILES["cpu_local"]
    return memory_model.PROFILES["gpu_te" if impl == "transformer_engine" else "gpu_local"]


def predicted_peak(run, geom, impl: str, pipeline_rank: int, dp: int, micro_batches: int):
    step = memory_model.StepShape(run.train.micro_batch, micro_batches, dp, run.train.precision,
                                  run.train.recompute)
    return memory_model.rank_memory(run.model, run.parallel, geom, step, pipeline_rank,
                                    memory_profile(impl))


def run_benchmark(run, steps: int = 10, warmup: int = 2, data: str | None = "synthetic",
                  profile_comm: bool = True) -> dict:
    """Initialise the layout, build, warm up, time `steps` steps; every rank returns the same
    summary (max memory over ranks). Launch like training (torchrun / srun / one process).
    `data`: as settle_data; the summary's `data_source` says which data was measured."""
    from megatron.core import parallel_state

    from ov2_megatron.models import specs
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize, local_device
    from ov2_megatron.training.loop import build_model_and_optimizer, prepare_data, train_step
    from ov2_megatron.training.run_config import validate_run

    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    data, source = settle_data(run, data, world)
    geom = validate_run(run, world, capability)
    p, t = run.parallel, run.train
    initialize(ParallelLayout(p.tensor, p.pipeline, p.virtual_pipeline), seed=t.seed)
    impl = specs.resolve_impl(run.model.transformer_impl, run.parallel.sequence_parallel)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    micro_batches = t.global_batch // (t.micro_batch * dp)
    device = local_device()
    if not torch.cuda.is_available():
        warm_libraries(run)
    memory = PeakMemory()
    memory.baseline()
    if data == "synthetic":
        stream = SyntheticStream(run, geom, micro_batches, dp_rank, device)
    else:
        prepare_data(run, dp)  # the synthetic set on first use; the data checks again
        geom = validate_run(run, world, capability)  # the vocabulary follows the tokenizer
        stream = _loader_stream(run, geom, micro_batches, dp_rank, dp, device)
    model, optimizer, scheduler = build_model_and_optimizer(run, geom, impl)
    optimizer_seconds = _time_optimizer_steps(optimizer)
    for step in range(warmup):
        batches, _ = stream.step_batches(step)
        train_step(model, optimizer, scheduler, batches, geom, t.micro_batch)
    memory.reset()
    blocked = BlockedTimer()
    rows = []
    with blocked.active() if not torch.cuda.is_available() else contextlib.nullcontext():
        for step in range(warmup, warmup + steps):
            _sync()
            optimizer_seconds.clear()
            start = time.perf_counter()
            batches, data_wait = stream.step_batches(step)
            loss, _, totals = train_step(model, optimizer, scheduler, batches, geom,
                                         t.micro_batch)
            _sync()
            total = time.perf_counter() - start
            rows.append(dict(step=total, data_wait=data_wait, optimizer=sum(optimizer_seconds),
                             forward_backward=total - data_wait - sum(optimizer_seconds),
                             tokens=float(totals[1]), loss=loss))
    peak = memory.peak_bytes()
    comm = _comm_summary(blocked, steps)
    if torch.cuda.is_available() and profile_comm:
        comm = _profiled_comm(stream, model, optimizer, scheduler, geom, t.micro_batch,
                              warmup + steps)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    predicted = predicted_peak(run, geom, impl, pp_rank, dp, micro_batches)
    parameters = sum(p.numel() for chunk in model for p in chunk.parameters())
    per_rank = _gather(dict(rank=dist.get_rank(), pp_rank=pp_rank, peak=peak,
                            predicted=predicted.peak, process_peak=memory.process_peak_bytes(),
                            parameters=parameters, predicted_parameters=predicted.parameters))
    result = _summarise(run, geom, impl, world, dp, micro_batches, steps, warmup, data, rows,
                        comm, per_rank, memory.method)
    result["data_source"] = source
    return result


def _time_optimizer_steps(optimizer) -> list[float]:
    """Wrap this optimizer object's `step` (only this instance) to record its seconds."""
    seconds: list[float] = []
    original = optimizer.step

    def timed_step(*args, **kwargs):
        _sync()
        start = time.perf_counter()
        result = original(*args, **kwargs)
        _sync()
        seconds.append(time.perf_counter() - start)
        return result

    optimizer.step = timed_step
    return seconds


def _comm_summary(blocked: BlockedTimer, steps: int) -> dict:
    by_kind = {kind: blocked.seconds.get(kind, 0.0) / steps for kind in KINDS}
    return dict(exposed=sum(by_kind.values()), by_kind=by_kind,
                method="host time blocked in c10d Work.wait (gloo), per step; pipeline "
                       "includes the bubble")


def _profiled_comm(stream, model, optimizer, scheduler, geom, micro_batch, step) -> dict:
    from ov2_megatron.training.loop import train_step

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    try:
        batches, _ = stream.step_batches(step)
        with torch.profiler.profile(activities=activities) as prof:
            train_step(model, optimizer, scheduler, batches, geom, micro_batch)
            torch.cuda.synchronize()
        exposed, total = exposed_from_kernels(prof.events())
    except Exception as error:  # a profiler failure must not lose the benchmark
        return dict(exposed=None, by_kind={}, method=f"profiler failed: {error}")
    return dict(exposed=exposed, by_kind={"nccl_total": total},
                method="one profiled step: NCCL kernel time not overlapped by compute kernels")


def _gather(item: dict) -> list[dict]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [item]
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, item)
    return items


def _summarise(run, geom, impl, world, dp, micro_batches, steps, warmup, data, rows, comm,
               per_rank, memory_method) -> dict:
    p, t = run.parallel, run.train
    step_time = statistics.median(r["step"] for r in rows)
    median = {k: statistics.median(r[k] for r in rows)
              for k in ("data_wait", "forward_backward", "optimizer")}
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    peak = peak_for(device_name, PEAK_BF16) if torch.cuda.is_available() else None
    per_device = t.global_batch / step_time / world  # images per second per device
    model_flops = model_flops_per_sample(run.model, geom) * per_device
    hw_flops = train_flops_per_sample(run.model, geom, t.recompute) * per_device
    basis = "no bf16 peak known for this device"
    if peak:
        basis = f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
        if run.model.fp8:
            fp8 = peak_for(device_name, PEAK_FP8)
            basis = (f"FP8 run ({run.model.fp8}): MFU against the bf16 peak "
                     f"{peak / 1e12:.0f}; FP8 peak {fp8 / 1e12 if fp8 else float('nan'):.0f}")
    measured = [r["peak"] for r in per_rank if r["peak"] is not None]
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        host=socket.gethostname(), device=device_name, world=world,
        recipe=run.name, stage=run.stage, impl=impl, data=data,
        layout=dict(tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, sp=p.sequence_parallel,
                    dp=dp),
        precision=t.precision, fp8=run.model.fp8, recompute=t.recompute,
        image_size=run.model.vision.image_size, micro_batch=t.micro_batch,
        micro_batches=micro_batches, global_batch=t.global_batch, steps=steps, warmup=warmup,
        step_time_s=step_time, step_times_s=[r["step"] for r in rows],
        images_per_s=t.global_batch / step_time,
        tokens_per_s=statistics.median(r["tokens"] for r in rows) / step_time,
        tflops_per_device=model_flops / 1e12, hw_tflops_per_device=hw_flops / 1e12,
        mfu=model_flops / peak if peak else None, hfu=hw_flops / peak if peak else None,
        mfu_basis=basis,
        split_s=dict(data_wait=median["data_wait"], forward_backward=median["forward_backward"],
                     optimizer=median["optimizer"], exposed_comm=comm["exposed"],
                     comm_by_kind=comm["by_kind"]),
        split_method=comm["method"],
        peak_memory_gib=max(measured) / GiB if measured else None,
        predicted_memory_gib=max(r["predicted"] for r in per_rank) / GiB,
        per_rank_memory_gib=[dict(rank=r["rank"], pp_rank=r["pp_rank"],
                                  measured=None if r["peak"] is None else r["peak"] / GiB,
                                  predicted=r["predicted"] / GiB,
                                  process_peak=None if r["process_peak"] is None
                                  else r["process_peak"] / GiB,
                                  parameters=r["parameters"],
                                  predicted_parameters=r["predicted_parameters"])
                             for r in per_rank],
        memory_method=memory_method, loss=rows[-1]["loss"],
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        versions=_versions())


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def _versions() -> dict:
    import megatron.core

    return dict(torch=torch.__version__, megatron_core=megatron.core.__version__,
                python=platform.python_version())
