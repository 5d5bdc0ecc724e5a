"""This framework against a case computed by the official OpenVision 2 code.

    python tools/check_official_parity.py --fixture tests/fixtures/openvision2_official
    python tools/check_official_parity.py --fixture DIR --tp 2 --sp      # TP=2 + SP
    python tools/check_official_parity.py --fixture DIR --pp 2           # two pipeline stages
    python tools/check_official_parity.py --fixture DIR --align 16       # FP8's padding
    python tools/check_official_parity.py --fixture DIR --fused-kernels  # the GPU flags

DIR is laid out like tests/fixtures/openvision2_official/ (any geometry its meta.json gives).
The official flax parameters are converted into this model (ov2_megatron/conversion/
official_format.py), which then runs the case's batch with its kept-token indices through the
training path itself: megatron DDP, the pipeline schedule and finalize_model_grads, on TP x PP
gloo ranks (one process per rank). Prints

    official L0 ours L1 rel R
    worst gradient <name> rel G over N tensors

(G = max |ours - official| / max |official| of that tensor) and exits 1 when R or G exceeds
1e-5, 2 when the case cannot be read.

    python tools/check_official_parity.py --trajectory --fixture DIR [--tp N] [--sp] [--pp N]
        [--moment fp32|bf16] [--clip-grad X] [--decay-embedding]

--trajectory reproduces the official optimizer steps of DIR (laid out like the shared
fixture openvision2_official_trajectory/, ov2_megatron/conversion/official_trajectory.py)
through the real training path: build_model_and_optimizer (DDP, distributed optimizer, LR
schedule) with the official schedule and Adam settings from its meta.json, the official
initial weights copied in (then adopt_loaded_weights), and train_step per official step,
each step's batch as two micro-batches (one if the batch is odd). Prints

    step K official LOSS ours LOSS                                   (one line per step)
    params after K steps: global rel L2 X, worst tensor Y (NAME) (...)

X = ||ours - official|| / ||official - start|| over all parameters, Y = the largest
max |ours - official| / max |official - start| of one tensor; attention key biases are left
out of both (their exact gradient is zero: softmax ignores q.b_k, so Adam turns float noise
there into steps of arbitrary sign, in both frameworks). Exits 1 unless every loss is within
1e-5, X <= 1e-5 and Y <= 1e-4 (and a step whose LR is not the official one is named and
fails: the schedule is the first suspect of a drifting trajectory); 2 when the trajectory cannot be read or uses a schedule or
optimizer this framework does not run. `--moment bf16` compares against the official recipe
whose Adam first moment is stored in bf16 (megatron keeps fp32 moments: expected to fail);
`--clip-grad 1.0` (clipping the official code never does) and `--decay-embedding` (also
decaying the caption token embedding, which the official mask leaves alone) are controls
that must fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ov2_megatron.upstream_warnings import quiet_upstream_notices

TOLERANCE = 1e-5
MICRO_BATCHES = 2  # the batch runs as two micro-batches: accumulation and pipelining are real
# --trajectory: per-step loss (absolute), all parameters (relative L2), the worst tensor.
LOSS_TOLERANCE, GLOBAL_TOLERANCE, WORST_TOLERANCE = 1e-5, 1e-5, 1e-4
quiet_upstream_notices()  # module level: spawned ranks import this file too


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", required=True, help="official case directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--align", type=int, default=None,
                        help="pad both sequences to a multiple of this (16 is what FP8 needs)")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="megatron's fused bias-GELU / bias-dropout-add / softmax kernels, "
                             "as on GPUs (torch.compile'd on CPU: slow to start)")
    parser.add_argument("--trajectory", action="store_true",
                        help="reproduce the fixture's official optimizer steps")
    parser.add_argument("--moment", choices=("fp32", "bf16"), default=None,
                        help="--trajectory: the official run to compare with, by the dtype of "
                             "its stored Adam first moment (default fp32, megatron's)")
    parser.add_argument("--clip-grad", type=float, default=None,
                        help="--trajectory control: clip the gradient norm (official: never)")
    parser.add_argument("--decay-embedding", action="store_true",
                        help="--trajectory control: also decay the caption token embedding")
    args = parser.parse_args(argv)
    if not args.trajectory and (args.moment or args.clip_grad is not None
                                or args.decay_embedding):
        parser.error("--moment, --clip-grad and --decay-embedding need --trajectory")
    args.moment, args.clip_grad = args.moment or "fp32", args.clip_grad or 0.0
    return args


def _setup(args):
    from ov2_megatron.config import ParallelConfig, geometry, validate_model
    from ov2_megatron.conversion import official_case
    from ov2_megatron.training.run_config import RunConfig, TrainConfig

    case = official_case.load(args.fixture)
    parallel = ParallelConfig(tensor=args.tp, pipeline=args.pp, sequence_parallel=args.sp)
    validate_model(case.model, parallel)
    batch = case.images.shape[0]
    if batch % MICRO_BATCHES:
        raise ValueError(f"the case's batch of {batch} does not split into {MICRO_BATCHES} "
                         "micro-batches")
    run = RunConfig(name="official_parity", model=case.model, parallel=parallel,
                    train=TrainConfig(global_batch=batch, micro_batch=batch // MICRO_BATCHES,
                                      precision="fp32", seed=0))
    return case, run, geometry(case.model, parallel, alignment=args.align)


def _rank(rank: int, world: int, port: int, args, out_dir: str) -> None:
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize, shutdown
    from ov2_megatron.training.loop import build_model_and_optimizer
    from ov2_megatron.training.step import run_schedule

    _join(rank, world, port)
    case, run, geom = _setup(args)
    initialize(ParallelLayout(args.tp, args.pp), seed=0)
    model, _, _ = build_model_and_optimizer(run, geom, fused_kernels=args.fused_kernels or None)
    chunk = unwrap_model(model[0])
    _copy_official(chunk, case.weights, run, geom, args.tp)
    micro = run.train.micro_batch
    batches = _micro_batches(case.images, case.tokens, case.keep_idx, micro)
    model[0].zero_grad_buffer()
    totals = run_schedule(model, batches, geom, micro, forward_only=False)
    grads = {name: _full_grad(param) for name, param in chunk.named_parameters()}
    loss = run.model.decoder.loss_weight * float(totals[0] / totals[1])
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        # TP ranks hold the same full gradients; PP stages hold disjoint ones
        torch.save(dict(loss=loss, grads=_standard(grads, chunk, run)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()


def _join(rank: int, world: int, port: int) -> None:
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _copy_official(chunk, weights: dict, run, geom, tp: int) -> None:
    """The official tensors (standard names) into this rank's shards of the chunk."""
    from megatron.core import parallel_state

    from ov2_megatron.models import state_dict_adapter as adapter

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in chunk.named_parameters():
        adapter.copy_from_standard(param, name, chunk.plan,
                                   weights[adapter.standard_name(name, chunk.plan)],
                                   *_heads(run), geom.padded_vocab, tp, tp_rank)


def _heads(run) -> tuple[int, int]:
    return run.model.vision.shape()[0].num_heads, run.model.decoder.shape().num_heads


def _standard(full: dict, chunk, run) -> dict:
    """One chunk's TP-gathered tensors under standard names and layouts."""
    from ov2_megatron.models import state_dict_adapter as adapter

    return adapter.to_standard(full, chunk.plan, *_heads(run), run.model.decoder.vocab_size)


def _micro_batches(images, tokens, keep_idx, micro: int) -> list:
    from ov2_megatron.training.step import MicroBatch

    return [MicroBatch(images[i:i + micro], tokens[i:i + micro], keep_idx[i:i + micro])
            for i in range(0, images.shape[0], micro)]


def _full_grad(param):
    """The TP-gathered gradient after finalize_model_grads (zeros for frozen parameters)."""
    import torch

    grad = getattr(param, "main_grad", None)
    return _tp_gathered(param, torch.zeros_like(param) if grad is None else grad.detach().clone())


def _tp_gathered(param, shard):
    """The full tensor of a TP-sharded parameter's `shard` (as given where it is not sharded)."""
    import torch
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return shard
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _spawn(rank_fn, args) -> list[dict]:
    """Run `rank_fn` on TP x PP gloo ranks; what the ranks saved, in rank order."""
    import torch
    import torch.multiprocessing as mp

    from ov2_megatron.parallel.initialize import free_port

    world = args.tp * args.pp
    with tempfile.TemporaryDirectory(prefix="ov2-parity-") as out_dir:
        mp.spawn(rank_fn, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, name), weights_only=True)
                for name in sorted(os.listdir(out_dir), key=lambda n: int(n[4:-3]))]


def run_ranks(args) -> tuple[float, dict]:
    results = _spawn(_rank, args)
    grads = {name: g for result in results for name, g in result["grads"].items()}
    return results[-1]["loss"], grads  # the last pipeline stage's rank holds the loss


def _trajectory_setup(args):
    """The trajectory, the run config its official recipe maps to, and the geometry."""
    from ov2_megatron.config import ParallelConfig, geometry, validate_model
    from ov2_megatron.conversion import official_trajectory
    from ov2_megatron.training.run_config import RunConfig, TrainConfig

    trajectory = official_trajectory.load(args.fixture, args.moment)
    parallel = ParallelConfig(tensor=args.tp, pipeline=args.pp, sequence_parallel=args.sp)
    validate_model(trajectory.model, parallel)
    batch, opt = trajectory.batch_size, trajectory.optimizer
    micro_batches = MICRO_BATCHES if batch % MICRO_BATCHES == 0 else 1
    train = TrainConfig(
        steps=opt.total_steps, lr=opt.lr, min_lr=opt.min_lr, warmup_steps=opt.warmup_steps,
        weight_decay=opt.weight_decay, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps,
        clip_grad=args.clip_grad, precision="fp32", global_batch=batch,
        micro_batch=batch // micro_batches, seed=0)
    run = RunConfig(name="official_trajectory", model=trajectory.model, parallel=parallel,
                    train=train)
    return trajectory, run, geometry(trajectory.model, parallel, alignment=args.align)


def _decay_the_caption_embedding_too() -> None:
    """--decay-embedding: the old, wrong weight-decay mask. optimizer.py bound `decays` at
    import, so the name is replaced there (before build_model_and_optimizer reads it)."""
    from ov2_megatron.training import optimizer

    official = optimizer.decays
    optimizer.decays = lambda name: official(name) or name == "decoder.tok_embed.weight"


def _trajectory_rank(rank: int, world: int, port: int, args, out_dir: str) -> None:
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize, shutdown
    from ov2_megatron.training.loop import (adopt_loaded_weights, build_model_and_optimizer,
                                            train_step, weights_gathered)

    _join(rank, world, port)
    trajectory, run, geom = _trajectory_setup(args)
    if args.decay_embedding:
        _decay_the_caption_embedding_too()
    initialize(ParallelLayout(args.tp, args.pp), seed=0)
    model, optimizer, scheduler = build_model_and_optimizer(
        run, geom, fused_kernels=args.fused_kernels or None)
    chunk = unwrap_model(model[0])
    _copy_official(chunk, trajectory.start, run, geom, args.tp)
    adopt_loaded_weights(optimizer)  # the masters were taken from the fresh init
    micro, losses, lrs = run.train.micro_batch, [], []
    for step in trajectory.batches:
        lrs.append(float(optimizer.param_groups[0]["lr"]))  # what this step's update uses
        batches = _micro_batches(step.images, step.tokens, step.keep_idx, micro)
        loss, _, _ = train_step(model, optimizer, scheduler, batches, geom, micro)
        losses.append(run.model.decoder.loss_weight * loss)  # the official total loss
    with weights_gathered(model):  # in fp32 the weights are the optimizer's masters
        params = {name: _tp_gathered(param, param.detach().clone())
                  for name, param in chunk.named_parameters()}
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(dict(losses=losses, lrs=lrs, params=_standard(params, chunk, run)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()


def trajectory_main(args) -> int:
    from ov2_megatron.conversion import ConversionError
    from ov2_megatron.conversion.official_trajectory import compare_params, is_key_bias

    try:
        trajectory, run, geom = _trajectory_setup(args)
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_trajectory_header(args, trajectory, run, geom), flush=True)
    results = _spawn(_trajectory_rank, args)
    params = {name: p for result in results for name, p in result["params"].items()}
    ok = _report_steps(trajectory, results[-1]["losses"], results[-1]["lrs"])
    rel, worst_name, worst = compare_params(trajectory.start, trajectory.final, params)
    print(f"params after {len(trajectory.batches)} steps: global rel L2 {rel:.2e}, worst tensor "
          f"{worst:.2e} ({worst_name}) (attention key biases excluded: "
          f"{sum(map(is_key_bias, params))} tensors)")
    return 0 if ok and rel <= GLOBAL_TOLERANCE and worst <= WORST_TOLERANCE else 1


def _report_steps(trajectory, losses: list[float], lrs: list[float]) -> bool:
    """One line per step; a learning rate other than the official one is named. True when
    every loss is within LOSS_TOLERANCE and every LR is the official one."""
    ok = True
    for k, (want, got) in enumerate(zip(trajectory.losses, losses), start=1):
        print(f"step {k} official {want:.7f} ours {got:.7f}")
        ok &= abs(got - want) <= LOSS_TOLERANCE
    for k, (want, got) in enumerate(zip(trajectory.lrs, lrs), start=1):
        if abs(got - want) > 1e-6 * trajectory.optimizer.lr:  # the official LRs are fp32
            print(f"learning rate differs at step {k}: official {want:.9g} ours {got:.9g}")
            ok = False
    return ok


def _trajectory_header(args, trajectory, run, geom) -> str:
    batch, micro = run.train.global_batch, run.train.micro_batch
    split = (f"{batch // micro} micro-batches of {micro}" if micro < batch
             else "1 micro-batch (odd batch)")
    controls = "".join([f", clip-grad {args.clip_grad}" if args.clip_grad else "",
                        ", caption embedding decayed too" if args.decay_embedding else ""])
    return (f"# trajectory TP={args.tp}{'+SP' if args.sp else ''} PP={args.pp}: "
            f"{len(trajectory.batches)} official steps vs {trajectory.reference}, batch {batch} "
            f"as {split}; sequences ViT {geom.vit_tokens}->{geom.vit_seq}, decoder "
            f"{geom.decoder_tokens}->{geom.decoder_seq}{controls}")


def compare(official_loss: float, loss: float, official: dict, ours: dict) -> tuple[float, str, float]:
    """(loss rel, name of the worst gradient, its rel). A tensor the official loss does not
    reach (all zero) is measured in absolute terms."""
    missing = sorted(set(official) ^ set(ours))
    if missing:
        raise ValueError(f"gradients without a counterpart: {missing[:8]}")
    worst_name, worst = "", 0.0
    for name, want in official.items():
        scale = float(want.abs().max())
        diff = float((ours[name].float() - want).abs().max())
        rel = diff / scale if scale > 0 else diff
        if rel >= worst:
            worst_name, worst = name, rel
    return abs(loss - official_loss) / abs(official_loss), worst_name, worst


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU/gloo: the check must mean the same anywhere
    if args.trajectory:
        return trajectory_main(args)
    from ov2_megatron.conversion import ConversionError

    try:
        case, _, geom = _setup(args)
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    loss, grads = run_ranks(args)
    rel, worst_name, worst = compare(case.loss, loss, case.grads, grads)
    layout = f"TP={args.tp}{'+SP' if args.sp else ''} PP={args.pp}" + \
        (f" align={geom.alignment}" if args.align else "") + \
        (" fused-kernels" if args.fused_kernels else "")
    print(f"# {layout}; sequences ViT {geom.vit_tokens}->{geom.vit_seq}, decoder "
          f"{geom.decoder_tokens}->{geom.decoder_seq}")
    print(f"official {case.loss:.6f} ours {loss:.6f} rel {rel:.2e}")
    print(f"worst gradient {worst_name} rel {worst:.2e} over {len(grads)} tensors")
    return 1 if rel > TOLERANCE or worst > TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
