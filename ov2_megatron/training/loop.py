"""The training loop: set-up in a fixed, commented order, then steps, checkpoints, evaluation.

Order of set-up (each step needs the previous one):
 1. choose the data sources (own shards switch the synthetic set off, data_sources.py) and
    validate the whole run config; own shards and their tokenizer are opened here too
    (before any process group or allocation);
 2. process groups (NCCL, or gloo + the CPU backend) and RNG seeds; then the output
    directory's lock (run_lock: rank 0 takes it, every rank learns the outcome), before the
    run writes anything there;
 3. the synthetic dataset on first use and its checks (rank 0 builds it, the rest wait);
 4. this rank's model chunks -> GPU -> megatron DDP (grad buffers) -> distributed optimizer;
 5. state: resume from the run's latest checkpoint (on another data-parallel size too:
    elastic_resume.py), else stage-2 init from stage 1;
 6. the data loader, positioned where the checkpoint left it (replica_stream.py keeps the
    data split of the first start).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import psutil
import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from ov2_megatron import cpu_allocator
from ov2_megatron.config import SequenceGeometry
from ov2_megatron.data.replica_stream import ReplicaStream, stream_states
from ov2_megatron.models import specs
from ov2_megatron.models.flops import device_peak_flops, model_flops_per_sample
from ov2_megatron.models.openvision2 import build_chunks
from ov2_megatron.parallel.initialize import (ParallelLayout, initialize, local_device,
                                            local_world_size)
from ov2_megatron.training import (checkpoint, data_sources, elastic_resume, evaluate,
                                   process_lifetime, replica_input, run_checks, run_lock,
                                   stage_transfer)
from ov2_megatron.training.metrics import (DataWaitMonitor, IntervalMeans, MetricsLogger,
                                           data_wait_fraction)
from ov2_megatron.training.optimizer import build_optimizer
from ov2_megatron.training.run_config import (RunConfig, lr_rule, overlap_settings, total_steps,
                                              validate_run, warmup_rule)
from ov2_megatron.training.step import BatchStream, run_schedule


class StopRequested:
    """SIGTERM / SIGUSR1 (Slurm preemption or time limit) and a first Ctrl-C (SIGINT) ->
    checkpoint at the next step end. A KeyboardInterrupt raised inside DALI's iteration can
    deadlock it, so the first SIGINT only sets the flag; a second one interrupts at once.
    The handlers are process_lifetime's, which train.main installs before the heavy imports:
    a signal received since then counts here too."""

    def __init__(self):
        process_lifetime.install_stop_handlers()

    @property
    def signal(self) -> int | None:
        return process_lifetime.stop_signal()

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (a signal may reach only some)."""
        flag = torch.tensor([1.0 if self.signal else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def setup(run: RunConfig):
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    notes = data_sources.choose_sources(run)  # 1
    validate_run(run, world, capability)
    p = run.parallel
    layout = ParallelLayout(p.tensor, p.pipeline, p.virtual_pipeline)
    dp_size = layout.data_parallel_size(world)
    if not run.synthetic:  # the files exist already: fail before any process group
        # One rank opens the shards (a refusal there ends the job: torchrun, srun
        # --kill-on-bad-exit); every rank follows the tokenizer.
        first = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
        notes += data_sources.check_data(run, dp_size, shards=first)
        if first:
            notes += data_sources.loader_memory_check(run, world, local_world_size(world),
                                                      refuse=True)
    impl = specs.resolve_impl(run.model.transformer_impl, p.sequence_parallel)
    initialize(layout, seed=run.train.seed)  # 2
    if not torch.cuda.is_available():
        notes.append(f"cpu: {cpu_allocator.reuse_freed_memory()}")  # done by initialize
    run_lock.take_for_run(run.train.output_dir)  # before anything is written there
    if run.synthetic:
        notes += prepare_data(run, dp_size)  # 3
    geom = validate_run(run, world, capability)  # again: the vocabulary follows the tokenizer
    if dist.get_rank() == 0:
        print("\n".join(notes), flush=True)
    return (geom, impl, *build_model_and_optimizer(run, geom, impl))  # 4


def build_model_and_optimizer(run: RunConfig, geom: SequenceGeometry, impl: str = "local",
                              fused_kernels: bool | None = None):
    """Chunks -> GPU -> megatron DDP -> distributed optimizer + schedule, with the schedule
    hooks megatron's pipeline functions call (grad finalisation, loss scaling, no_sync).
    `fused_kernels` as in models/specs.stack_config (default: where CUDA is)."""
    p = run.parallel
    dtype = torch.bfloat16 if run.train.precision == "bf16" else torch.float32
    chunks = build_chunks(run.model, p, geom, impl, dtype, init_seed=run.train.seed,
                          recompute=run.train.recompute, fused_kernels=fused_kernels)
    overlap_grads, overlap_params = overlap_settings(run.train)
    # bucket_size None: megatron's default, max(40M, 1M x DP) elements when overlapping (one
    # bucket otherwise). Aligning the weight gather across chunks is for interleaved PP.
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, bucket_size=None,
        overlap_grad_reduce=overlap_grads, overlap_param_gather=overlap_params,
        align_param_gather=overlap_params and len(chunks) > 1)
    model = []
    for chunk in chunks:
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        model.append(DistributedDataParallel(chunk.config, ddp_config, chunk))
    optimizer, scheduler = build_optimizer(model, run.train)
    for chunk in model:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        chunk.config.no_sync_func = _per_chunk(model, "no_sync")
        # The schedules start each chunk's gradient reduction (and, interleaved, weight
        # gather) at the point megatron's pipeline order allows, as Megatron-LM sets them.
        if overlap_grads:
            chunk.config.grad_sync_func = _per_chunk(model, "start_grad_sync")
        if ddp_config.align_param_gather:
            chunk.config.param_sync_func = _per_chunk(model, "start_param_sync")
    return model, optimizer, scheduler


def _per_chunk(model: list, method: str):
    """The schedules' hook form: one bound method per chunk, or the one chunk's."""
    bound = [getattr(chunk, method) for chunk in model]
    return bound if len(bound) > 1 else bound[0]


@contextlib.contextmanager
def weights_gathered(model: list):
    """Every rank holds all the updated weights inside the block. With overlap_param_gather
    the all-gather after optimizer.step waits for the next forward's hooks, so a checkpoint
    (DP rank 0 writes each tensor) or an evaluation would otherwise read other ranks' shards
    stale: force the gather, and re-arm the hooks after (as Megatron-LM does)."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def prepare_data(run: RunConfig, dp_size: int | None = None) -> list[str]:
    """Build the synthetic set on first use (rank 0; the others wait), fill the data paths it
    provides, then check the data (data_sources.check_data: the shards on rank 0, the
    tokenizer everywhere). Needs the process groups."""
    if run.synthetic:
        from ov2_megatron.data.synthetic import ensure_synthetic_dataset

        cache = os.environ.get("OV2_CACHE", os.path.expanduser("~/.cache/ov2_megatron"))
        if dist.get_rank() == 0:
            ensure_synthetic_dataset(cache, **run.synthetic)
        dist.barrier()
        data = ensure_synthetic_dataset(cache, **run.synthetic)  # a no-op lookup now
        run.data.train_shards = run.data.train_shards or data.train_dir
        run.data.val_shards = run.data.val_shards or data.val_dir
        run.data.tokenizer_model = run.data.tokenizer_model or data.tokenizer_model
    if dp_size is None:
        dp_size = dist.get_world_size() // (run.parallel.tensor * run.parallel.pipeline)
    # One rank opens the shards; every rank follows the tokenizer (as in setup).
    return data_sources.check_data(run, dp_size, shards=dist.get_rank() == 0)


def train(run: RunConfig) -> dict:
    """Run (or resume) the stage described by `run`; returns the final summary. The run
    directory's lock (run_lock, taken in setup) is released however the run ends."""
    try:
        return _train(run)
    finally:
        run_lock.release_all()


def _train(run: RunConfig) -> dict:
    stop = StopRequested()  # first: a signal during a long set-up must not kill the rank
    checkpoint.start_writer_shielded()
    geom, impl, model, optimizer, scheduler = setup(run)
    t, p = run.train, run.parallel
    rank0 = dist.get_rank() == 0
    run_dir, root = t.output_dir, os.path.join(t.output_dir, "checkpoints")
    start_step, data_states = _restore(run, model, optimizer, scheduler, geom)  # 5
    # Only now, every check and load done: a refused or failed start leaves the run as it was.
    if rank0:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(run.to_json())
    checkpoint.clean_partial(root)
    dp_rank, dp_size = checkpoint.data_parallel_info()
    micro_batches = t.global_batch // (t.micro_batch * dp_size)
    if data_states is not None and not t.resume_data_stream:
        data_states = None
        if rank0:
            print("train.resume_data_stream=false: the data stream starts fresh", flush=True)
    reader = replica_input.reads_data()  # one loader per replica, not per rank
    table = _shard_table(run)  # the shards checked and indexed once, for every loader
    loader = ReplicaStream(run.data, replica=dp_rank, replicas=dp_size,
                           micro_batch=t.micro_batch, global_batch=t.global_batch,
                           saved=data_states, table=table) \
        if reader else replica_input.NotReading()  # 6
    if rank0:
        print(f"data: {loader.decoding}", flush=True)
        if not loader.passthrough:
            print(loader.describe(), flush=True)
    image_shape = (3, run.data.resolution, run.data.resolution)  # DALI decodes to RGB
    shared = replica_input.ReplicaInput(image_shape, run.data.caption_length, local_device())
    stream = BatchStream(loader if reader else None, geom, t.seed, t.micro_batch,
                         micro_batches, dp_rank, local_device(), shared)
    data_wait_monitor = DataWaitMonitor(t.data_wait_window, t.data_wait_warn_fraction)
    steps = total_steps(t)
    logger = MetricsLogger(run_dir, steps, enabled=rank0, data_wait=data_wait_monitor,
                           resumed_at=start_step)
    # Model FLOPs (recomputation excluded): MFU measures useful work, as in Megatron/PaLM.
    flops = model_flops_per_sample(run.model, geom)
    device_name, peak = device_peak_flops()
    interval = IntervalMeans(flops / dist.get_world_size(), peak)  # the progress line's means
    meta = dict(name=run.name, stage=run.stage,
                layout=checkpoint.layout_signature(p, dist.get_world_size()),
                tokenizer=run_checks.tokenizer_identity(run.data.tokenizer_model))
    skipped = nonfinite_in_row = 0
    step = start_step
    if rank0:
        print(f"{run.name} stage {run.stage}: {impl} layers, layout TP{p.tensor} PP{p.pipeline}"
              f" DP{dp_size}, {micro_batches} micro-batches/step, steps {start_step}->{steps}, "
              f"device {device_name}, {lr_rule(t)}, {warmup_rule(t)}", flush=True)
    while step < steps:
        batches, data_wait = stream.step_batches(step)
        started = time.perf_counter()
        loss, grad_norm, totals = train_step(model, optimizer, scheduler, batches, geom,
                                             t.micro_batch)
        if grad_norm is None:
            skipped, nonfinite_in_row = skipped + 1, nonfinite_in_row + 1
        else:
            nonfinite_in_row = 0
        step += 1
        elapsed = time.perf_counter() - started + data_wait
        logger.watch_data_wait(step, data_wait, elapsed)
        interval.add(loss, elapsed, data_wait, t.global_batch, float(totals[1]))
        if nonfinite_in_row >= t.max_nonfinite:
            with weights_gathered(model):
                checkpoint.save(root, step, model, optimizer, scheduler, meta, loader.state())
            raise RuntimeError(f"{nonfinite_in_row} non-finite losses in a row at step {step}: "
                               "stopped; the checkpoint holds the last good weights (lower "
                               "the LR: train.base_lr or train.lr; check the data, or raise "
                               "train.max_nonfinite)")
        if step % t.log_interval == 0 or step == steps or step == start_step + 1:
            tflops = flops * t.global_batch / elapsed / dist.get_world_size() / 1e12
            logger.log(step, dict(
                loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                token_accuracy=float(totals[2] / max(totals[1], 1)),
                images_per_s=t.global_batch / elapsed, tokens_per_s=float(totals[1]) / elapsed,
                tflops_per_device=tflops, mfu=(tflops * 1e12 / peak) if peak else None,
                data_wait_s=data_wait,
                data_wait_fraction=data_wait_fraction(data_wait, elapsed),
                memory_gb=_memory_gb(), skipped=skipped,
                bad_samples=loader.stats(),  # {reason: count}: metrics.py shows each
                **interval.take()))
        preempted = stop.agreed()
        if step % t.save_interval == 0 or step == steps or preempted:
            with weights_gathered(model):
                checkpoint.save(root, step, model, optimizer, scheduler, meta, loader.state())
            checkpoint.prune(root, t.keep_last)
        if preempted:
            if rank0:
                print(f"stop signal {stop.signal or 'on another rank'}: checkpoint saved at step "
                      f"{step}; rerun the same command to resume", flush=True)
            logger.close()
            return dict(step=step, preempted=True)
        if t.eval_interval and step % t.eval_interval == 0 and step < steps:
            with weights_gathered(model):
                evaluate.validation(run, model, geom, logger, step)
    with weights_gathered(model):
        summary = evaluate.final(run, model, geom, logger, step, loader)
    logger.close()
    return dict(step=step, preempted=False, **summary)


def train_step(model, optimizer, scheduler, batches, geom, micro_batch: int):
    """One optimizer step over `batches`; a non-finite loss skips the update (grad_norm None).
    Returns (global mean caption loss, grad norm, [loss_sum, tokens, correct])."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    totals = run_schedule(model, batches, geom, micro_batch, forward_only=False)
    loss = float(totals[0] / max(totals[1], 1))
    grad_norm = None
    if math.isfinite(loss):
        _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return loss, grad_norm, totals


def _shard_table(run: RunConfig):
    """The training set's ShardTable (data/shard_table.py), built by rank 0 (one check and
    count per shard, indexes made where missing) and sent to every rank, so that a reading
    rank opens only the shards of its stream's range."""
    from ov2_megatron.data.shard_table import build_table

    box = [build_table(run.data.train_shards, run.data.index_cache_dir)
           if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _say_interrupted_saves(output_dir: str) -> None:
    """A run whose only checkpoint saves were interrupted starts over: say so, rather than
    let step 1 appear as if nothing had run before."""
    root = os.path.join(output_dir, "checkpoints")
    partial = sorted(d for d in os.listdir(root) if d.endswith(".partial")) \
        if os.path.isdir(root) else []
    if partial and dist.get_rank() == 0:
        print(f"resume: no complete checkpoint in {root} (the save of {partial[-1]} was "
              "interrupted): starting from step 0", flush=True)


def _restore(run, model, optimizer, scheduler, geom: SequenceGeometry):
    """Weights, optimizer, RNG and schedule from the run's checkpoint, if any; returns the
    step to start at and the saved data-stream states (None: a fresh stream)."""
    command_lrs = _group_lrs(optimizer)  # before a load replaces them with the checkpoint's
    step_dir = checkpoint.resolve(run.train.output_dir)
    if step_dir is None:
        _say_interrupted_saves(run.train.output_dir)
        if run.train.init_from:
            stage_transfer.load_stage_weights(run.train.init_from, model, run)
            adopt_loaded_weights(optimizer)
        return 0, None
    meta = checkpoint.read_meta(step_dir)
    run_checks.check_same_tokenizer(meta.get("tokenizer"),
                                    run_checks.tokenizer_identity(run.data.tokenizer_model),
                                    f"the checkpoint {step_dir}")
    checkpoint.load_weights(step_dir, model)
    saved, layout = meta["layout"], checkpoint.layout_signature(run.parallel,
                                                                 dist.get_world_size())
    rank0 = dist.get_rank() == 0
    if saved == layout:
        data_states = stream_states(checkpoint.load_rank_state(step_dir, optimizer))
    elif elastic_resume.reshardable(saved, layout) and "ranks" in meta:
        data_states = [stream for state in checkpoint.load_resharded_state(step_dir, meta,
                                                                           optimizer)
                       for stream in stream_states(state)]
        if rank0:
            print(f"resuming {step_dir} on data-parallel size {_dp_size(saved)} -> "
                  f"{_dp_size(layout)}: optimizer state resharded, LR schedule and data "
                  "position carried over", flush=True)
    else:
        if rank0:
            print(f"resuming {step_dir} under a new layout ({saved} -> {layout}): weights "
                  "loaded; optimizer moments and data position restart, the LR schedule "
                  f"continues from step {meta['step']} (only the data-parallel size may change "
                  "with the optimizer state kept, in checkpoints that list their ranks' "
                  "coordinates)", flush=True)
        adopt_loaded_weights(optimizer)
        data_states = None
    _continue_schedule(scheduler, optimizer, meta, command_lrs, rank0)
    return meta["step"], data_states


# megatron's scheduler fields as the user sets them (run_config.py says which field gives each).
_SCHEDULE_FIELDS = {"lr_decay_steps": "steps", "max_lr": "peak LR", "min_lr": "final LR",
                    "lr_warmup_steps": "warmup steps", "start_wd": "weight decay"}


def _group_lrs(optimizer) -> list[tuple[float | None, float | None]]:
    """Each param group's peak and final LR, which megatron's scheduler reads before its own."""
    return [(group.get("max_lr"), group.get("min_lr")) for group in optimizer.param_groups]


def _continue_schedule(scheduler, optimizer, meta: dict, command_lrs: list, announce: bool):
    """Put the LR schedule at the checkpoint's step under this command's schedule, saying what
    differs from the checkpoint's. megatron's load_state_dict would keep the checkpoint's
    values instead (use_checkpoint_opt_param_scheduler, its default), without a word: an
    extended run trained at LR 0 and a changed LR was ignored. The optimizer's own state
    carries each group's peak and final LR too: the command's are put back (`command_lrs`,
    read before the load). The same schedule gives the same LRs as before, bitwise."""
    for group, (max_lr, min_lr) in zip(optimizer.param_groups, command_lrs):
        for key, value in (("max_lr", max_lr), ("min_lr", min_lr)):
            if value is not None:
                group[key] = value
    scheduler.step(increment=meta["step"])
    saved, now = meta.get("scheduler") or {}, scheduler.state_dict()
    changed = [f"{label} {saved[key]:g} -> {now[key]:g}" for key, label in _SCHEDULE_FIELDS.items()
               if key in saved and saved[key] != now[key]]
    if changed and announce:
        print(f"resume: this command's schedule differs from the checkpoint's "
              f"({', '.join(changed)}); training continues from step {meta['step']} under "
              "this command's", flush=True)


def adopt_loaded_weights(optimizer) -> None:
    """After weights were written into the model behind the optimizer's back (a weights-only
    load: stage 2, another TP/PP layout, an imported checkpoint): refresh its fp32 master
    copies from them. In bf16 the distributed optimizer keeps its own fp32 copy of every
    weight, cloned when it was built, and each step writes that copy back into the model: the
    first step would otherwise restore the freshly initialised weights (in fp32 the masters
    are views of the weights themselves). Megatron-LM calls this after such loads too."""
    optimizer.reload_model_params()


def _dp_size(layout: dict) -> int:
    return layout["world_size"] // (layout["tensor"] * layout["pipeline"])


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30
