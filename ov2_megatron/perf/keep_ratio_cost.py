"""Step cost against model FLOPs across token-drop keep ratios, with an op-level breakdown.

    python tools/bench.py --keep-ratios 0.25,0.35,0.5,1.0 --rounds 4 --threads 1

One process builds one OpenVision 2 trainer per keep ratio (side_by_side.scaled_l14: the
L/14 token counts in miniature) and, with `masks=("in_place", "out_of_place")`, one per
ratio and mask form: megatron's own in-place masked_fill_ (the cost before the fix in
models/specs.UnfusedAttention) and the out-of-place mask the local spec now uses. Steps of
every trainer run in turn, the order reversed every round, so load drift on a shared machine
hits them alike. Per step it records wall time, the process's CPU time (user and system:
on a loaded machine CPU time is what the step itself spent; with one thread it does not
count time spent waiting for a core) and the memory newly faulted in (minor page faults x
4 KiB: the kernel zeroing fresh pages is system time that no FLOP model counts). Then
profiled steps of every trainer (two each, in turn) give each op's share of the self CPU
time, and the share of the non-GEMM ops on the decoder's [b, heads, s, s] attention tensors.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from ov2_megatron.perf.side_by_side import _batch, _Trainer, scaled_l14

MASKS = ("in_place", "out_of_place")


def _in_place_mask(trainer: _Trainer) -> None:
    """Restore megatron's in-place attention_mask_func in every core attention (the 'before')."""
    from megatron.core.transformer.utils import attention_mask_func

    for module in trainer.module.modules():
        softmax = getattr(module, "scale_mask_softmax", None)
        if softmax is not None:
            softmax.mask_func = attention_mask_func


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def _timed(step) -> dict:
    w0, u0, s0, f0 = _usage()
    step()
    w1, u1, s1, f1 = _usage()
    return dict(wall=w1 - w0, user=u1 - u0, sys=s1 - s0, cpu=u1 - u0 + s1 - s0,
                faulted_mib=(f1 - f0) * 4 / 1024)


def _profile(steps: dict, seqs: dict, rounds: int, top: int) -> dict:
    """Self CPU time by op in `rounds` profiled steps of every trainer (in turn, like the
    timed rounds; summed over the rounds, so one preempted op weighs less), and the share of
    the non-GEMM ops that read a [.., s, s] tensor (s = that trainer's decoder sequence)."""
    from torch.profiler import ProfilerActivity, profile

    by_op = {key: {} for key in steps}
    square = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for key, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            for event in prof.key_averages(group_by_input_shape=True):
                us, ops = event.self_cpu_time_total, by_op[key]
                ops[event.key] = ops.get(event.key, 0.0) + us
                if _on_square(event, seqs[key]):
                    square[key] += us
    out = {}
    for key, ops in by_op.items():
        total = sum(ops.values())
        ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        out[key] = dict(total_ms=total / 1e3 / rounds, top=[(n, us / total) for n, us in ranked],
                        shares={n: us / total for n, us in ops.items()},
                        decoder_square_non_gemm=square[key] / total)
    return out


def _on_square(event, seq: int) -> bool:
    if event.key.startswith(("aten::bmm", "aten::baddbmm")):
        return False
    return any(isinstance(s, (list, tuple)) and len(s) >= 2 and s[-1] == seq and s[-2] == seq
               for s in event.input_shapes)


def keep_ratio_cost(ratios=(0.25, 0.35, 0.5, 1.0), batch: int = 16, rounds: int = 4,
                    masks=MASKS, threads: int | None = None, seed: int = 0,
                    profile_rounds: int = 2, profile_top: int = 12) -> dict:
    """Median step cost per (mask, ratio), its ratio to keep 0.35 (or the first ratio) and
    the model-FLOP ratio; op shares from `profile_rounds` profiled steps each (module
    docstring)."""
    from ov2_megatron.models.flops import model_flops_per_sample
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    if threads:
        torch.set_num_threads(threads)
    initialize(ParallelLayout(), seed=seed)
    runs, flops, seqs = {}, {}, {}
    for ratio in ratios:
        model = scaled_l14(ratio)
        for mask in masks:
            trainer = _Trainer("ov2", model, seed)
            if mask == "in_place":
                _in_place_mask(trainer)
            data = [_batch(model, trainer.geom, batch, seed + i) for i in range(2)]
            runs[(mask, ratio)] = (trainer, data)
        flops[ratio] = model_flops_per_sample(model, trainer.geom)
        seqs[ratio] = trainer.geom.decoder_seq
    order = list(runs)
    samples = {key: [] for key in order}
    for round_ in range(rounds + 1):  # round 0 warms up
        for key in order if round_ % 2 else order[::-1]:
            trainer, data = runs[key]
            sample = _timed(lambda: trainer.step(*data[round_ % 2]))
            if round_:
                samples[key].append(sample)
    base = 0.35 if 0.35 in ratios else ratios[0]
    rows = []
    for mask, ratio in order:
        median = {m: statistics.median(s[m] for s in samples[(mask, ratio)])
                  for m in ("wall", "user", "sys", "cpu", "faulted_mib")}
        rows.append(dict(mask=mask, keep_ratio=ratio, decoder_seq=seqs[ratio],
                         flops_per_sample=flops[ratio], flops_ratio=flops[ratio] / flops[base],
                         samples=samples[(mask, ratio)], **{f"{m}_s" if m != "faulted_mib"
                                                            else m: v for m, v in median.items()}))
    for row in rows:
        ref = next(r for r in rows if r["mask"] == row["mask"] and r["keep_ratio"] == base)
        row.update(wall_ratio=row["wall_s"] / ref["wall_s"], cpu_ratio=row["cpu_s"] / ref["cpu_s"],
                   user_ratio=row["user_s"] / ref["user_s"],
                   min_cpu_ratio=_min_cpu(row) / _min_cpu(ref))
    steps = {key: (lambda t=trainer, d=data: t.step(*d[0]))
             for key, (trainer, data) in runs.items()}
    profiles = _profile(steps, {key: seqs[key[1]] for key in runs}, profile_rounds, profile_top)
    for row in rows:
        row["profile"] = profiles[(row["mask"], row["keep_ratio"])]
    return dict(batch=batch, rounds=rounds, threads=torch.get_num_threads(), base=base,
                rows=rows)


def _min_cpu(row: dict) -> float:
    return min(sample["cpu"] for sample in row["samples"])


def markdown(result: dict) -> str:
    """The cost table and, per row, the top ops with their shares of the profiled step."""
    lines = [f"batch {result['batch']}, {result['threads']} thread(s), medians of "
             f"{result['rounds']} alternating rounds; ratios against keep {result['base']}",
             "", "| mask | keep | decoder seq | FLOPs x | CPU ms | CPU x | CPU x / FLOPs x | "
             "min-CPU x | user x | sys ms | faulted MiB | wall x | decoder s^2 non-GEMM share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mask']} | {r['keep_ratio']} | {r['decoder_seq']} | "
                     f"{r['flops_ratio']:.3f} | {r['cpu_s'] * 1e3:.0f} | {r['cpu_ratio']:.3f} | "
                     f"{r['cpu_ratio'] / r['flops_ratio']:.3f} | {r['min_cpu_ratio']:.3f} | "
                     f"{r['user_ratio']:.3f} | {r['sys_s'] * 1e3:.0f} | "
                     f"{r['faulted_mib']:.0f} | {r['wall_ratio']:.3f} | "
                     f"{100 * r['profile']['decoder_square_non_gemm']:.1f}% |")
    for r in result["rows"]:
        ops = ", ".join(f"{name.removeprefix('aten::')} {100 * share:.1f}%"
                        for name, share in r["profile"]["top"])
        lines.append(f"\n{r['mask']} keep {r['keep_ratio']} (profiled step "
                     f"{r['profile']['total_ms']:.0f} ms, self time by op): {ops}")
    return "\n".join(lines)
