"""tools/plan.py: the ranked layout table for clusters far larger than this machine, and
the properties its time model must have (analytic, no processes)."""

import pytest

from ov2_megatron.perf import planner
from ov2_megatron.perf.hardware import accelerator
from tools import plan as plan_tool

G14 = ["--variant", "g/14", "--resolution", "224", "--global-batch", "32768", "--gpu", "h100",
       "--gpus", "256"]


def test_cli_prints_ranked_table_for_g14_on_256_h100(capsys):
    assert plan_tool.main(G14 + ["--top", "10"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "g/14 @ 224px" in lines[0] and "256 x H100" in lines[0]
    assert "989 TFLOP/s" in out and "NVLink 360 GB/s" in out  # assumptions are stated
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["#", "TP", "SP"])
    rows = [line.split() for line in lines[header + 1:header + 11]]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    steps = [float(r[12]) for r in rows]
    assert steps == sorted(steps)  # ranked by predicted step time
    for r in rows:  # every row is a real layout of 256 GPUs that fits 80 GB
        tp, pp, dp = int(r[1]), int(r[3]), int(r[5])
        assert tp * pp * dp == 256 and float(r[9]) <= 79.2


def test_plans_fit_and_agree_with_the_memory_model():
    gpu = accelerator("h100")
    model = planner.model_for("g/14", 224)
    plans = planner.plan(model, 32768, 256, gpu)
    fits = [p for p in plans if p.fits]
    assert fits and len(fits) < len(plans)  # some layouts (big micro-batches) do not fit
    usable = planner.Assumptions().usable_bytes(gpu)
    assert all(p.memory.peak <= usable for p in fits)
    assert all(p.memory.peak > usable for p in plans[len(fits):])
    best = fits[0]
    assert 0.2 < best.mfu < gpu.gemm_efficiency
    # g/14 at 224 px is compute-bound at this scale: compute is most of the best step.
    assert best.time.compute > 0.7 * best.time.total


def test_time_model_properties():
    gpu = accelerator("h100")
    model = planner.model_for("L/14", 224)
    by_layout = {}
    for p in planner.plan(model, 4096, 64, gpu):
        key = (p.parallel.tensor, p.parallel.pipeline, p.parallel.sequence_parallel,
               p.parallel.virtual_pipeline, p.micro_batch, p.recompute)
        by_layout[key] = p
    base = by_layout[(1, 1, False, None, 32, "none")]
    assert base.time.tp_comm == base.time.pp_comm == base.time.bubble == 0
    full = by_layout[(1, 1, False, None, 32, "full")]
    assert full.time.compute > 1.2 * base.time.compute  # recompute re-runs the forward
    assert full.memory.activations < 0.2 * base.memory.activations
    tp2 = by_layout[(2, 1, True, None, 32, "none")]
    assert tp2.time.tp_comm > 0 and tp2.memory.static < base.memory.static
    pp4 = by_layout[(1, 4, False, None, 8, "none")]
    pp4_v2 = by_layout[(1, 4, False, 2, 8, "none")]
    assert pp4.time.bubble > pp4_v2.time.bubble > 0  # interleaving shrinks the bubble
    # Twice the GPUs, same global batch: about half the compute per GPU.
    doubled = {(p.parallel.tensor, p.parallel.pipeline, p.micro_batch, p.recompute): p
               for p in planner.plan(model, 4096, 128, gpu) if not p.parallel.sequence_parallel
               and p.parallel.virtual_pipeline is None}[(1, 1, 32, "none")]
    assert doubled.time.compute == pytest.approx(base.time.compute / 2, rel=1e-6)


def test_nothing_fits_is_reported(capsys):
    args = ["--variant", "G/14", "--resolution", "224", "--global-batch", "64", "--gpus", "1",
            "--memory-gib", "8"]
    assert plan_tool.main(args) == 1
    assert "nothing fits" in capsys.readouterr().out
