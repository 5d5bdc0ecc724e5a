"""Benchmark OpenVision 2 training: throughput, MFU, memory and where the step's time goes.

    python tools/bench.py --recipe tiny_cpu --steps 5 --json bench.json        # one layout
    python tools/bench.py --recipe vit_l14 --set data.train_shards=/data/shards \\
        --set data.tokenizer_model=/data/sp.model                               # your shards
    torchrun --nproc-per-node 8 tools/bench.py --recipe vit_l14 --stage 2 \\
        --set train.global_batch=512 --steps 20                                 # GPUs
    python tools/bench.py --sweep sweep.json --out runs/bench                  # every entry
    sbatch --array=0-N launch/bench_sweep.slurm sweep.json runs/bench         # cluster
    python tools/bench.py --merge runs/bench                                    # one table
    python tools/bench.py --vs-reference                                        # megatron / twin
    python tools/bench.py --ov1-vs-ov2                                          # OV1 / OV2 cost
    python tools/bench.py --loss-kernels                                        # plain / chunked head
    python tools/bench.py --keep-ratios 0.25,0.35,0.5,1.0 --threads 1          # cost vs FLOPs

Each run prints one JSON summary and one markdown row (ov2_megatron/perf/benchmark.py says
what is measured and how), the data it measured (`data measured:`; given data.train_shards,
the DALI loader reads them, the vocabulary following data.tokenizer_model, as in a run),
plus its time to first step (`time_to_first_step_s`: from this tool's start to the end of
the run's first training step, so imports, process groups, the model build and the first
step's compilation and autotuning, which step times leave out).
On CPU the peak memory is read in a child process started with the environment that makes
the reading sound (ov2_megatron/perf/peak_memory.py), and the steps are timed in this process,
with malloc as training sets it (ov2_megatron/cpu_allocator.py): under the pinned environment
every allocation of 64 KiB or more is mapped and unmapped, which doubles a CPU step's time.
Under a launcher (several CPU ranks) both are measured in one pinned process, and the result
says that its times are slow (`timing_allocator`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

STARTED = time.perf_counter()  # before torch and megatron are imported: they count too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHED = "RANK" in os.environ or "SLURM_PROCID" in os.environ  # torchrun / srun ranks
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", metavar="FILE", help="run the entries of a sweep file")
    mode.add_argument("--merge", metavar="DIR", help="merge result JSONs into DIR/results.md")
    mode.add_argument("--vs-reference", action="store_true",
                      help="megatron training step vs the pure-PyTorch twin (CPU, TP=1)")
    mode.add_argument("--loss-kernels", action="store_true",
                      help="plain vs chunked caption loss at vit_l14's decoder width and vocab")
    mode.add_argument("--ov1-vs-ov2", action="store_true",
                      help="OpenVision 1 objective vs OpenVision 2, same encoder and batch")
    mode.add_argument("--keep-ratios", metavar="LIST",
                      help="step cost vs model FLOPs at these keep ratios (comma-separated), "
                           "megatron's in-place attention mask and the local spec's side by side")
    parser.add_argument("--recipe", default=None, help="recipe name (ov2_megatron/recipes.py)")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a run-config field (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=5,
                        help="--vs-reference / --ov1-vs-ov2 / --keep-ratios: alternating "
                           "timed rounds")
    parser.add_argument("--threads", type=int, default=None,
                        help="--keep-ratios: torch threads (1 makes CPU time robust to load)")
    parser.add_argument("--data", choices=("synthetic", "loader"), default=None,
                        help="what feeds the steps: the DALI loader (default when "
                        "data.train_shards is set: your shards) or synthetic batches in memory "
                        "(default otherwise); the output says which data it measured")
    parser.add_argument("--json", help="write the result JSON here")
    parser.add_argument("--out", help="--sweep: directory for the per-run JSONs")
    parser.add_argument("--index", type=int, default=None,
                        help="--sweep: run only this entry, in this process (array task)")
    parser.add_argument("--no-memory", action="store_true",
                        help="--ov1-vs-ov2: skip the two memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _restart_pinned_on_cpu() -> None:
    """CPU ranks under a launcher: re-exec once with MALLOC_MMAP_THRESHOLD_ /
    MKL_DISABLE_FAST_MM set (they only act from process start); a no-op on GPUs and where
    the launcher set them."""
    import torch

    from ov2_megatron.perf.peak_memory import environment_pinned, pinned_environment

    if torch.cuda.is_available() or environment_pinned():
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], pinned_environment())


def _write(path: str | None, result: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _run_config(args, default_recipe: str):
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.run_config import apply_overrides

    return apply_overrides(get_recipe(args.recipe or default_recipe, args.stage), args.overrides)


@contextlib.contextmanager
def first_step_clock():
    """Yields a dict that gets `time_to_first_step_s` when the run's first train_step ends.

    run_benchmark looks `train_step` up in ov2_megatron.training.loop when it is called, so
    wrapping that attribute for the call's duration times the run's own first step. The CPU
    warm-up twin (benchmark.warm_libraries, a one-layer copy) is not the run: its step is
    not counted. The moment is also printed at once, so a run killed by a time limit
    (tools/gpu_check.sh) still leaves it in the log."""
    import torch

    from ov2_megatron.perf import benchmark
    from ov2_megatron.training import loop

    clock, twin = {}, {"running": False}
    original_step, original_warm = loop.train_step, benchmark.warm_libraries

    def timed_step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        if not clock and not twin["running"]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            clock["time_to_first_step_s"] = time.perf_counter() - STARTED
            print(f"bench.py: first step done {clock['time_to_first_step_s']:.1f} s after "
                  "start", file=sys.stderr, flush=True)
        return out

    def untimed_twin(*args, **kwargs):
        twin["running"] = True
        try:
            return original_warm(*args, **kwargs)
        finally:
            twin["running"] = False

    loop.train_step, benchmark.warm_libraries = timed_step, untimed_twin
    try:
        yield clock
    finally:
        loop.train_step, benchmark.warm_libraries = original_step, original_warm


def bench(args) -> int:
    import torch.distributed as dist

    from ov2_megatron.perf import report
    from ov2_megatron.perf.benchmark import run_benchmark, settle_data

    # Before the memory child and any process group: bad shards fail here, in one line (on a
    # copy: run_benchmark settles its own run again).
    _, source = settle_data(_run_config(args, "tiny_cpu"), args.data,
                            int(os.environ.get("WORLD_SIZE", 1)))
    run = _run_config(args, "tiny_cpu")
    if int(os.environ.get("RANK", 0)) == 0 and not args.memory_only:
        print(f"bench.py: data: {source}", file=sys.stderr, flush=True)
    memory = _memory_in_pinned_child(args) if _times_apart_from_memory(args) else None
    if args.memory_only:
        args.steps = 1
    with first_step_clock() as clock:
        result = run_benchmark(run, steps=args.steps, warmup=args.warmup, data=args.data)
    result.update(memory or {})
    first = clock.get("time_to_first_step_s")
    if first is not None:  # the memory child ran before this run started its own clock
        first -= result.get("memory_child_s", 0.0)
    result["time_to_first_step_s"] = first
    result["timing_allocator"] = _timing_allocator(memory is not None)
    if dist.get_rank() == 0:
        _write(args.json, result)
        print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}))
        print(report.markdown_header())
        print(report.markdown_row(result))
        print(f"data measured: {result['data_source']}")
        first = result["time_to_first_step_s"]
        print(f"time to first step: {'n/a' if first is None else f'{first:.1f} s'} (tool start "
              "to the end of the first training step: imports, build, compilation)")
    return 0


MEMORY_FIELDS = ("peak_memory_gib", "predicted_memory_gib", "per_rank_memory_gib",
                 "memory_method")


def _times_apart_from_memory(args) -> bool:
    """A lone CPU process outside the pinned environment: memory goes to a child."""
    import torch

    from ov2_megatron.perf.peak_memory import environment_pinned

    return not (torch.cuda.is_available() or environment_pinned() or args.memory_only
                or LAUNCHED)


def _memory_in_pinned_child(args) -> dict:
    """Run this benchmark again (one timed step) in a pinned child; its memory fields."""
    from ov2_megatron.perf.peak_memory import pinned_environment

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory-only",
               "--json", out]
        started = time.perf_counter()
        child = subprocess.run(cmd, env=pinned_environment(), capture_output=True, text=True)
        if child.returncode:
            sys.stderr.write(child.stderr[-4000:])
            raise RuntimeError(f"the pinned memory run failed (exit {child.returncode}): "
                               + " ".join(cmd))
        with open(out) as f:
            measured = json.load(f)
    memory = {key: measured[key] for key in MEMORY_FIELDS}
    memory["memory_child_s"] = time.perf_counter() - started
    return memory


def _timing_allocator(memory_apart: bool) -> str:
    import torch

    from ov2_megatron import cpu_allocator
    from ov2_megatron.perf.peak_memory import environment_pinned

    if torch.cuda.is_available():
        return "CUDA caching allocator"
    if environment_pinned():
        return ("pinned for the memory reading (every allocation >= 64 KiB mapped and "
                "unmapped): CPU step times about 2x slow")
    return cpu_allocator.reuse_freed_memory() + (" (memory read in a pinned child)"
                                                 if memory_apart else "")


def sweep(args) -> int:
    from ov2_megatron.perf import report

    entries = report.load_sweep(args.sweep)
    out = args.out or os.path.join("runs", "bench")
    os.makedirs(out, exist_ok=True)
    if args.index is not None:  # one array task: this process is one rank of the run
        entry = entries[args.index]
        args = parse_args(report.entry_arguments(entry)
                          + ["--json", os.path.join(out, entry["name"] + ".json")])
        code = bench(args)
        import torch.distributed as dist

        if dist.get_rank() == 0:  # every task merges what exists; the last one sees all
            print(report.merge(out))
        return code
    failed = []
    for entry in entries:
        cmd = [sys.executable, os.path.abspath(__file__), *report.entry_arguments(entry),
               "--json", os.path.join(out, entry["name"] + ".json")]
        print(f"--- {entry['name']}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode:
            failed.append(entry["name"])
    print(report.merge(out))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def vs_reference(args) -> int:
    from tools.vs_reference import megatron_vs_reference

    run = _run_config(args, "tiny_cpu")
    if not any(o.startswith("train.global_batch=") for o in args.overrides):
        run.train.global_batch = run.train.micro_batch  # one micro-batch per step
    result = megatron_vs_reference(run, rounds=args.rounds)
    result["command"] = " ".join(["python", *sys.argv])
    _write(args.json, result)
    m, r = result["split_s"]["megatron"], result["split_s"]["reference"]
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}))
    print(f"megatron train_step {result['megatron_s'] * 1e3:.1f} ms (fwd-bwd "
          f"{m['forward_backward'] * 1e3:.1f}, of which collectives {m['collectives'] * 1e3:.1f};"
          f" optimizer {m['optimizer'] * 1e3:.1f}) vs reference {result['reference_s'] * 1e3:.1f}"
          f" ms (fwd-bwd {r['forward_backward'] * 1e3:.1f}, optimizer "
          f"{r['optimizer'] * 1e3:.1f}): {result['ratio']:.2f}x (target <= 1.15x); first loss "
          f"{result['first_loss']['megatron']:.6f} vs {result['first_loss']['reference']:.6f}")
    return 0


def _model_comparison(args, compare, model, micro_batch: int) -> dict:
    """`compare(model, micro_batch, ...)` after the --set overrides; writes and prints it."""
    from ov2_megatron.training.run_config import RunConfig, TrainConfig, apply_overrides

    run = apply_overrides(RunConfig(model=model, train=TrainConfig(micro_batch=micro_batch)),
                          args.overrides)
    result = compare(run.model, run.train.micro_batch, rounds=args.rounds,
                     measure_memory=not args.no_memory)
    result["command"] = " ".join(["python", *sys.argv])
    _write(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("times_s", "losses")}))
    return result


def ov1_vs_ov2(args) -> int:
    """OV1 / OV2 and the breakdown (OV1 with one part after another switched off), on
    scaled_l14 with the plain fp32-logits head both sides, as the official code has."""
    import functools

    from ov2_megatron.perf.side_by_side import ov1_vs_ov2 as compare
    from ov2_megatron.perf.side_by_side import scaled_l14

    model = scaled_l14()
    model.decoder.loss_kernel = "plain"
    result = _model_comparison(args, functools.partial(compare, breakdown=True), model,
                               micro_batch=16)
    t = result["time_s"]
    line = (f"OV1 {t['ov1'] * 1e3:.0f} ms / OV2 {t['ov2'] * 1e3:.0f} ms per step: time "
            f"{result['time_ratio']:.2f}x (paper 1.5x)")
    if "memory_ratio" in result:
        mem = result["memory_bytes"]
        line += (f"; peak memory {mem['ov1'] / 2**20:.0f} / {mem['ov2'] / 2**20:.0f} MiB: "
                 f"{result['memory_ratio']:.2f}x (paper 1.8x)")
    print(line)
    for name, part in result["parts"].items():
        memory = (f", memory {part['memory_bytes'] / 2**20:+.0f} MiB "
                  f"({part['memory_share']:.0%})") if "memory_bytes" in part else ""
        print(f"  {name}: time {part['time_s'] * 1e3:+.0f} ms ({part['time_share']:.0%})"
              f"{memory}, parameters {part['parameters']:+,}")
    return 0


def loss_kernels(args) -> int:
    from ov2_megatron.perf.side_by_side import l14_decoder_at_vocab_32k
    from ov2_megatron.perf.side_by_side import loss_kernels as compare

    result = _model_comparison(args, compare, l14_decoder_at_vocab_32k(), micro_batch=8)
    t = result["time_s"]
    line = (f"caption loss plain {t['plain'] * 1e3:.0f} ms / chunked {t['chunked'] * 1e3:.0f} ms"
            f" per step: chunked/plain time {result['time_ratio']:.2f}x")
    if "memory_ratio" in result:
        mem, head = result["memory_bytes"], result["head_bytes"]
        line += (f"; peak {mem['plain'] / 2**20:.0f} / {mem['chunked'] / 2**20:.0f} MiB "
                 f"({result['memory_ratio']:.2f}x); head's share {head['plain'] / 2**20:.0f} / "
                 f"{head['chunked'] / 2**20:.0f} MiB (>= {result['head_memory_ratio']:.1f}x, "
                 "floored at one 64 MiB logits chunk; goal >= 4x)")
    print(line)
    return 0


def keep_ratios(args) -> int:
    from ov2_megatron.perf.keep_ratio_cost import keep_ratio_cost, markdown
    from ov2_megatron.training.run_config import RunConfig, TrainConfig, apply_overrides

    ratios = tuple(float(r) for r in args.keep_ratios.split(","))
    run = apply_overrides(RunConfig(train=TrainConfig(micro_batch=16)), args.overrides)
    result = keep_ratio_cost(ratios, run.train.micro_batch, args.rounds, threads=args.threads)
    result["command"] = " ".join(["python", *sys.argv])
    _write(args.json, result)
    print(markdown(result))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.merge:
        from ov2_megatron.perf import report

        print(report.merge(args.merge))
        return 0
    if args.sweep and args.index is None:
        return sweep(args)
    if LAUNCHED and not (args.vs_reference or args.ov1_vs_ov2 or args.loss_kernels
                         or args.keep_ratios):
        _restart_pinned_on_cpu()
    if not LAUNCHED:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # a lone process
    try:
        if args.sweep:
            return sweep(args)
        if args.vs_reference:
            return vs_reference(args)
        if args.ov1_vs_ov2:
            return ov1_vs_ov2(args)
        if args.loss_kernels:
            return loss_kernels(args)
        if args.keep_ratios:
            return keep_ratios(args)
        return bench(args)
    except (ValueError, OSError) as error:  # OSError: a missing or unreadable shard
        print(f"bench.py: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
