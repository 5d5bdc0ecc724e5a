"""tools/plan.py on plain transformer shapes (ViT, CLIP, GPT), and the properties of the
collective and DP-overlap models the planner relies on."""

import pytest

from ov2_megatron.perf import collectives, planner
from ov2_megatron.perf.hardware import accelerator
from ov2_megatron.perf.published_runs import RUNS
from tools import plan as plan_tool

GPT_175B = ["--model", "gpt", "--layers", "96", "--hidden", "12288", "--heads", "96",
            "--seq", "2048", "--vocab", "51200", "--gpus", "1024", "--tp", "8", "--pp", "8",
            "--micro-batch", "1", "--global-batch", "1536", "--gpu", "a100"]


@pytest.mark.parametrize("argv, unit", [
    (GPT_175B, "tokens/s"),
    (["--model", "vit", "--layers", "40", "--hidden", "1408", "--heads", "16", "--ffn", "6144",
      "--prefix-tokens", "8", "--gpus", "8", "--micro-batch", "64", "--global-batch", "4096",
      "--stack", "legacy", "--no-distributed-optimizer", "--gpu", "a100"], "images/s"),
    (["--model", "clip", "--layers", "40", "--hidden", "1408", "--heads", "16", "--ffn",
      "6144", "--text-layers", "24", "--text-hidden", "1024", "--text-heads", "16", "--gpus",
      "16", "--tp", "2", "--micro-batch", "40", "--global-batch", "640", "--gpu", "h200"],
     "images/s"),
])
def test_cli_predicts_plain_shapes(argv, unit, capsys):
    assert plan_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert unit in out and "MFU" in out


def test_cli_vit_row_equals_the_published_table(capsys):
    run = next(r for r in RUNS if r.name == "NeMo ViT g/14, 8 A100")
    argv = ["--model", "vit", "--layers", "40", "--hidden", "1408", "--heads", "16", "--ffn",
            "6144", "--prefix-tokens", "8", "--gpus", "8", "--micro-batch", "64",
            "--global-batch", "4096", "--stack", "legacy", "--no-distributed-optimizer",
            "--gpu", "a100"]
    plan_tool.main(argv)
    out = capsys.readouterr().out
    assert f"({run.pinned_per_gpu:,.1f} images/s per GPU)" in out


def test_cli_rejects_a_layout_that_does_not_divide(capsys):
    assert plan_tool.main(GPT_175B[:-6] + ["--global-batch", "1000", "--gpu", "a100"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_collectives_latency_and_tree():
    gpu = accelerator("h100")
    node = collectives.group(8, 1, gpu)
    # A tiny all-reduce costs its latency, not zero; a large one its bandwidth.
    assert collectives.all_reduce(1, node, gpu) > 8e-6
    big = 1e9
    assert collectives.ring_all_reduce(big, node, gpu) == pytest.approx(
        2 * 7 / 8 * big / gpu.intra_node_bandwidth, rel=0.02)
    # Across 512 nodes the tree's log2 latency beats the ring's linear one for small messages.
    wide = collectives.group(512, 8, gpu)
    assert collectives.tree_all_reduce(1e5, wide, gpu) < collectives.ring_all_reduce(1e5, wide,
                                                                                    gpu)
    assert collectives.all_reduce(1e5, wide, gpu) == collectives.tree_all_reduce(1e5, wide,
                                                                                 gpu)


def test_dp_overlap_hides_the_weight_all_gather():
    gpu = accelerator("h100")
    model = planner.model_for("L/14", 224)

    def best(assume):
        return {(p.parallel.tensor, p.parallel.pipeline, p.micro_batch, p.recompute): p
                for p in planner.plan(model, 4096, 64, gpu, assume)
                if not p.parallel.sequence_parallel and not p.parallel.virtual_pipeline}

    on = best(planner.Assumptions())[(1, 1, 32, "none")]
    off = best(planner.Assumptions(overlap_grad_reduce=False,
                                   overlap_param_gather=False))[(1, 1, 32, "none")]
    assert off.time.dp_exposed > 3 * on.time.dp_exposed > 0
    assert on.time.compute == off.time.compute
