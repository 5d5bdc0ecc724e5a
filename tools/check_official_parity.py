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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ov2_megatron.upstream_warnings import quiet_upstream_notices

TOLERANCE = 1e-5
MICRO_BATCHES = 2  # the batch runs as two micro-batches: accumulation and pipelining are real
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
    return parser.parse_args(argv)


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

    from ov2_megatron.models import state_dict_adapter as adapter
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize, shutdown
    from ov2_megatron.training.loop import build_model_and_optimizer
    from ov2_megatron.training.step import MicroBatch, run_schedule

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    case, run, geom = _setup(args)
    initialize(ParallelLayout(args.tp, args.pp), seed=0)
    model, _, _ = build_model_and_optimizer(run, geom, fused_kernels=args.fused_kernels or None)
    chunk = unwrap_model(model[0])
    vit_heads, dec_heads = run.model.vision.shape()[0].num_heads, run.model.decoder.shape().num_heads
    tp, tp_rank = args.tp, parallel_state.get_tensor_model_parallel_rank()
    for name, param in chunk.named_parameters():
        adapter.copy_from_standard(param, name, chunk.plan,
                                   case.weights[adapter.standard_name(name, chunk.plan)],
                                   vit_heads, dec_heads, geom.padded_vocab, tp, tp_rank)
    micro = run.train.micro_batch
    batches = [MicroBatch(case.images[i:i + micro], case.tokens[i:i + micro],
                          case.keep_idx[i:i + micro])
               for i in range(0, case.images.shape[0], micro)]
    model[0].zero_grad_buffer()
    totals = run_schedule(model, batches, geom, micro, forward_only=False)
    grads = {name: _full_grad(param) for name, param in chunk.named_parameters()}
    standard = adapter.to_standard(grads, chunk.plan, vit_heads, dec_heads,
                                   run.model.decoder.vocab_size)
    loss = run.model.decoder.loss_weight * float(totals[0] / totals[1])
    if tp_rank == 0:  # TP ranks hold the same full gradients; PP stages hold disjoint ones
        torch.save(dict(loss=loss, grads=standard), os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()


def _full_grad(param):
    """The TP-gathered gradient after finalize_model_grads (zeros for frozen parameters)."""
    import torch
    from megatron.core import parallel_state

    grad = getattr(param, "main_grad", None)
    grad = torch.zeros_like(param) if grad is None else grad.detach().clone()
    if not getattr(param, "tensor_model_parallel", False):
        return grad
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(grad) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, grad.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def run_ranks(args) -> tuple[float, dict]:
    import torch
    import torch.multiprocessing as mp

    from ov2_megatron.parallel.initialize import free_port

    world = args.tp * args.pp
    with tempfile.TemporaryDirectory(prefix="ov2-parity-") as out_dir:
        mp.spawn(_rank, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
        results = [torch.load(os.path.join(out_dir, name), weights_only=True)
                   for name in sorted(os.listdir(out_dir))]
    grads = {name: g for result in results for name, g in result["grads"].items()}
    return results[-1]["loss"], grads  # the last pipeline stage's rank holds the loss


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
