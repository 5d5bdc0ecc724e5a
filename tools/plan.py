"""Rank the TP/PP/DP/recompute/micro-batch layouts of an OpenVision 2 run on a GPU cluster,
or predict one given layout of a plain transformer (ViT classifier, CLIP, decoder-only GPT).

    python tools/plan.py --variant g/14 --resolution 224 --global-batch 32768 --gpu h100 --gpus 256
    python tools/plan.py --variant L/14 --resolution 84 --global-batch 32768 --gpu h200 --gpus 64
    python tools/plan.py --model gpt --layers 96 --hidden 12288 --heads 96 --seq 2048 \
        --vocab 51200 --gpus 1024 --tp 8 --pp 8 --micro-batch 1 --global-batch 1536 --gpu a100
    python tools/plan.py --model clip --layers 40 --hidden 1408 --heads 16 --ffn 6144 \
        --text-layers 24 --text-hidden 1024 --text-heads 16 --gpus 8 --micro-batch 80 \
        --global-batch 640 --gpu h100
    python tools/plan.py --recipe vit_l14 --stage 1 --gpus 256 --cpu-cores-per-node 96
    python tools/plan.py --input-table --recipe vit_l14 vit_1b --input-gpus 8 256

Every ranked row also states the input it needs (images/s per node, the CPU cores that takes
at --decode-rate-per-core) and flags INPUT-BOUND where the node cannot supply it;
--input-table prints that row for each recipe, stage and GPU count.

Analytic (a second on a laptop): memory from ov2_megatron/perf/memory_model.py, step time
from FLOPs, an assumed matmul efficiency and a ring model of the collectives
(ov2_megatron/perf/planner.py states every assumption; each can be overridden here). The
memory model is checked against measured CPU peaks in tests/perf; the time model is not a
measurement: confirm the top rows with tools/bench.py on the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov2_megatron.perf import planner  # noqa: E402
from ov2_megatron.perf import transformer_plan as plain  # noqa: E402
from ov2_megatron.perf.hardware import ACCELERATORS, accelerator  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", nargs="+", choices=("vit_l14", "vit_1b"),
                        help="take the model, resolution and global batch from this recipe "
                             "(ov2_megatron/recipes.py; replaces --variant .. --vocab); "
                             "several with --input-table")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--model", default="ov2", choices=("ov2", "vit", "clip", "gpt"),
                        help="ov2 ranks layouts; vit/clip/gpt predict the one given layout")
    parser.add_argument("--variant", default="L/14", help="ViT variant, e.g. L/14, g/14")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--global-batch", type=int, default=32768)
    parser.add_argument("--gpu", default="h100", choices=sorted(ACCELERATORS))
    parser.add_argument("--gpus", type=int, default=8, help="total GPUs in the job")
    parser.add_argument("--decoder", default="L")
    parser.add_argument("--keep-ratio", type=float, default=0.35)
    parser.add_argument("--caption-length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--profile", default="gpu_te", choices=("gpu_te", "gpu_local"),
                        help="layer implementation the memory model assumes")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=None,
                        help="only these micro-batch sizes")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="override the GPU's large-GEMM efficiency (hardware.py)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="DP reduce-scatter and all-gather fully exposed")
    shapes = parser.add_argument_group("plain transformer shapes (--model vit|clip|gpt)")
    for name, default in (("layers", 24), ("hidden", 1024), ("heads", 16), ("ffn", None),
                          ("kv-heads", None), ("seq", 2048), ("image-size", 224), ("patch", 14),
                          ("prefix-tokens", 1), ("text-layers", 12), ("text-hidden", 768),
                          ("text-heads", 12), ("text-ffn", None), ("text-len", 77),
                          ("tp", 1), ("pp", 1), ("vpp", 1)):
        shapes.add_argument(f"--{name}", type=int, default=default)
    shapes.add_argument("--gated", action="store_true", help="SwiGLU MLP (Llama)")
    shapes.add_argument("--sequence-parallel", action="store_true")
    shapes.add_argument("--stack", default="megatron_te", choices=("megatron_te", "legacy"))
    shapes.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--memory-gib", type=float, help="override device memory")
    parser.add_argument("--nvlink-gbps", type=float, help="override intra-node GB/s")
    parser.add_argument("--network-gbps", type=float, help="override per-GPU network GB/s")
    parser.add_argument("--gpus-per-node", type=int)
    supply = parser.add_argument_group("input supply (defaults: planner.InputSupply)")
    supply.add_argument("--cpu-cores-per-node", type=int,
                        default=planner.InputSupply.cpu_cores_per_node)
    supply.add_argument("--decode-rate-per-core", type=float,
                        default=planner.InputSupply.decode_rate_per_core,
                        help="images per core-second the CPU path decodes and augments "
                             "(460 measured here for DALI CPU on 400-640 px JPEGs; ~950 is "
                             "PIL decode alone)")
    supply.add_argument("--gpu-decode-rate", type=float, default=None,
                        help="images/s one GPU's decoders supply (DALI mixed); given, the "
                             "INPUT-BOUND flag judges it instead of the CPU cores")
    supply.add_argument("--input-table", action="store_true",
                        help="the input-rate row of each --recipe at stages 1 and 2 and each "
                             "of --input-gpus, instead of the ranked table")
    supply.add_argument("--input-gpus", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", help="also write every layout to this file")
    return parser.parse_args(argv)


def plain_workload(args) -> plain.Workload:
    ffn = args.ffn or 4 * args.hidden
    if args.model == "gpt":
        return plain.gpt(args.layers, args.hidden, args.heads, ffn, args.seq, args.vocab,
                         args.kv_heads, args.gated)
    image = plain.vit(args.layers, args.hidden, args.heads, ffn, args.image_size, args.patch,
                      args.prefix_tokens)
    if args.model == "vit":
        return image
    return plain.clip(image, args.text_layers, args.text_hidden, args.text_heads,
                      args.text_ffn or 4 * args.text_hidden, args.text_len)


def predict_plain(args, gpu) -> int:
    workload = plain_workload(args)
    recompute = args.recompute[0] if len(args.recompute) == 1 else "none"
    layout = plain.Layout(args.gpus, args.global_batch, (args.micro_batch or [1])[0],
                          args.tp, args.pp, args.vpp, args.sequence_parallel, recompute,
                          stack=args.stack,
                          distributed_optimizer=not args.no_distributed_optimizer,
                          overlap_grad_reduce=not args.no_overlap,
                          overlap_param_gather=not args.no_overlap)
    p = plain.predict(workload, layout, gpu)
    unit = workload.unit
    print(f"{args.model} {workload.parameters() / 1e9:.2f}B parameters on {args.gpus} x "
          f"{args.gpu.upper()}: TP{layout.tp} PP{layout.pp} VPP{layout.vpp} DP{layout.dp}, "
          f"micro-batch {layout.micro_batch}, global {layout.global_batch}, {recompute} "
          f"recompute, {layout.stack}")
    print(f"step {p.step_s:.3f} s  {p.throughput:,.0f} {unit}/s  ({p.per_gpu:,.1f} {unit}/s "
          f"per GPU)  MFU {p.mfu:.1%}")
    print("  " + "  ".join(f"{k} {v / p.step_s:.0%}" for k, v in p.parts.items()
                           if k not in ("gpus", "micro_batches")))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    gbps = lambda v: v * 1e9 if v else None  # noqa: E731
    try:
        gpu = accelerator(args.gpu, memory_gib=args.memory_gib,
                          intra_node_bandwidth=gbps(args.nvlink_gbps),
                          inter_node_bandwidth=gbps(args.network_gbps),
                          gpus_per_node=args.gpus_per_node, gemm_efficiency=args.efficiency)
        if args.model != "ov2":
            return predict_plain(args, gpu)
        supply = planner.InputSupply(cpu_cores_per_node=args.cpu_cores_per_node,
                                     decode_rate_per_core=args.decode_rate_per_core,
                                     gpu_decode_rate=args.gpu_decode_rate)
        assume = planner.Assumptions(profile=args.profile, precision=args.precision,
                                     overlap_grad_reduce=not args.no_overlap,
                                     overlap_param_gather=not args.no_overlap)
        if args.input_table:
            return input_table(args, gpu, assume, supply)
        if args.recipe:
            recipe_shape(args, args.recipe[0], args.stage)
        model = planner.model_for(args.variant, args.resolution, args.keep_ratio, args.decoder,
                                  args.caption_length, args.vocab)
        plans = planner.plan(model, args.global_batch, args.gpus, gpu, assume,
                             tuple(args.recompute), args.micro_batch)
    except ValueError as error:
        print(f"plan.py: {error}", file=sys.stderr)
        return 2
    header = (f"OpenVision 2 {args.variant} @ {args.resolution}px + decoder {args.decoder}, "
              f"keep {args.keep_ratio}, global batch {args.global_batch:,} on {args.gpus} x "
              f"{args.gpu.upper()}")
    if args.recipe:
        header = f"{args.recipe[0]} stage {args.stage}: {header}"
    print(planner.format_table(plans, gpu, assume, args.top, header, supply))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([planner.as_dict(p, gpu.gpus_per_node, supply) for p in plans], f,
                      indent=1)
    return 0 if any(p.fits for p in plans) else 1


def recipe_shape(args, name: str, stage: int):
    """Set the model and batch arguments from a recipe; returns its parallel layout."""
    from ov2_megatron.recipes import get_recipe

    run = get_recipe(name, stage)
    vision, decoder = run.model.vision, run.model.decoder
    args.variant, args.resolution, args.keep_ratio = (vision.variant, vision.image_size,
                                                      vision.keep_ratio)
    args.decoder, args.caption_length, args.vocab = (decoder.variant, decoder.caption_length,
                                                     decoder.vocab_size)
    args.global_batch = run.train.global_batch
    return run.parallel


def input_table(args, gpu, assume, supply) -> int:
    """Each recipe x stage x GPU count: its layout's predicted step and the input it needs."""
    rows = []
    for name in args.recipe or ["vit_l14", "vit_1b"]:
        for stage in (1, 2):
            parallel = recipe_shape(args, name, stage)
            model = planner.model_for(args.variant, args.resolution, args.keep_ratio,
                                      args.decoder, args.caption_length, args.vocab)
            for gpus in args.input_gpus:
                plans = planner.plan(model, args.global_batch, gpus, gpu, assume,
                                     tuple(args.recompute), args.micro_batch)
                rows.append(planner.InputRow(name, stage, args.resolution, args.global_batch,
                                             gpus, planner.best_with_layout(plans, parallel)))
    print(planner.format_input_table(rows, gpu, supply))
    return 0 if all(r.plan for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
