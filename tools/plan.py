"""Rank the TP/PP/DP/recompute/micro-batch layouts of an OpenVision 2 run on a GPU cluster.

    python tools/plan.py --variant g/14 --resolution 224 --global-batch 32768 --gpu h100 --gpus 256
    python tools/plan.py --variant L/14 --resolution 84 --global-batch 32768 --gpu h200 --gpus 64

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
from ov2_megatron.perf.hardware import ACCELERATORS, accelerator  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="fraction of the bf16 peak the matmuls reach (default 0.5)")
    parser.add_argument("--memory-gib", type=float, help="override device memory")
    parser.add_argument("--nvlink-gbps", type=float, help="override intra-node GB/s")
    parser.add_argument("--network-gbps", type=float, help="override per-GPU network GB/s")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", help="also write every layout to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    gbps = lambda v: v * 1e9 if v else None  # noqa: E731
    try:
        gpu = accelerator(args.gpu, memory_gib=args.memory_gib,
                          intra_node_bandwidth=gbps(args.nvlink_gbps),
                          inter_node_bandwidth=gbps(args.network_gbps),
                          gpus_per_node=args.gpus_per_node)
        model = planner.model_for(args.variant, args.resolution, args.keep_ratio, args.decoder,
                                  args.caption_length, args.vocab)
        assume = planner.Assumptions(matmul_efficiency=args.efficiency,
                                     profile=args.profile, precision=args.precision)
        plans = planner.plan(model, args.global_batch, args.gpus, gpu, assume,
                             tuple(args.recompute), args.micro_batch)
    except ValueError as error:
        print(f"plan.py: {error}", file=sys.stderr)
        return 2
    header = (f"OpenVision 2 {args.variant} @ {args.resolution}px + decoder {args.decoder}, "
              f"keep {args.keep_ratio}, global batch {args.global_batch:,} on {args.gpus} x "
              f"{args.gpu.upper()}")
    print(planner.format_table(plans, gpu, assume, args.top, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([planner.as_dict(p) for p in plans], f, indent=1)
    return 0 if any(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
