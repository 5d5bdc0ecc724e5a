"""The input a layout needs (issue 16, item 1): images/s per node beside the step time, the
CPU cores that takes at a stated decode rate, and the INPUT-BOUND flag; pinned for the
vit_l14 and vit_1b recipes at both stages on 8 and 256 H100 (docs/benchmarks/
2026-12-02-input-rate.md holds the same table)."""

import contextlib
import io

import pytest

from ov2_megatron.config import ParallelConfig
from ov2_megatron.perf import planner
from ov2_megatron.perf.hardware import accelerator
from tools import plan as plan_tool

# (recipe, stage, GPUs): layout, images/s per node, cores at 460 img/s/core. Predictions of
# the planner's time model, so a recalibration of hardware.py moves them: re-pin with the
# doc's command and update the doc with them.
PINNED = {
    ("vit_l14", 1, 8): ("TP1 PP1 DP8 mb64 none", 18_565, 40),
    ("vit_l14", 1, 256): ("TP1 PP1 DP256 mb64 none", 10_185, 22),
    ("vit_l14", 2, 8): ("TP1 PP1 DP8 mb16 none", 5_013, 11),
    ("vit_l14", 2, 256): ("TP1 PP1 DP256 mb32 none", 3_470, 8),
    ("vit_1b", 1, 8): ("TP2+SP PP1 DP4 mb512 none", 7_798, 17),
    ("vit_1b", 1, 256): ("TP2+SP PP1 DP128 mb256 none", 6_585, 14),
    ("vit_1b", 2, 8): ("TP2+SP PP1 DP4 mb128 none", 1_537, 3),
    ("vit_1b", 2, 256): ("TP2+SP PP1 DP128 mb128 none", 1_440, 3),
}


def _table_rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells[:1] in (["vit_l14"], ["vit_1b"]):
            layout_end = cells.index("none") + 1 if "none" in cells else len(cells)
            rows[(cells[0], int(cells[1]), int(cells[4]))] = (
                " ".join(cells[6:layout_end]), *cells[layout_end:])
    return rows


@pytest.fixture(scope="module")
def default_table():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = plan_tool.main(["--input-table", "--recipe", "vit_l14", "vit_1b",
                               "--input-gpus", "8", "256"])
    return code, buffer.getvalue()


def test_input_table_pins_the_recipes_at_8_and_256_gpus(default_table):
    code, out = default_table
    assert code == 0
    assert "112 CPU cores/node, 104 free" in out and "460 img/s per core" in out
    assert "GPU decoding: no rate stated (not measured here)" in out
    rows = _table_rows(out)
    assert set(rows) == set(PINNED)
    for key, (layout, per_node, cores) in PINNED.items():
        got_layout, step, img_s, mfu, got_per_node, per_gpu, got_cores, flag = rows[key]
        assert got_layout == layout, key
        assert float(got_per_node.replace(",", "")) == pytest.approx(per_node, rel=0.02), key
        assert abs(int(got_cores) - cores) <= 1, key
        assert flag == "ok", key  # 104 free cores feed every recipe from full-size JPEGs
        # images/s per node = global batch / step / nodes
        batch = 32_768 if key[1] == 1 else 16_384
        nodes = max(key[2] // 8, 1)
        assert float(got_per_node.replace(",", "")) == pytest.approx(
            batch / float(step) / nodes, rel=0.01)


def test_fewer_cores_flag_stage_1_input_bound():
    """At 32 cores per node (24 free: 11,040 img/s) stage 1 of ViT-L/14 on one node cannot be
    fed from full-size JPEGs; stage 2 (224 px, 5,013 img/s per node) still can."""
    gpu = accelerator("h100")
    supply = planner.InputSupply(cpu_cores_per_node=32)
    for resolution, batch, bound in ((84, 32_768, True), (224, 16_384, False)):
        plans = planner.plan(planner.model_for("L/14", resolution), batch, 8, gpu)
        best = planner.best_with_layout(plans, ParallelConfig())
        need = planner.input_demand(best, gpu.gpus_per_node, supply)
        assert need.supplied_per_node == 24 * 460
        assert need.bound is bound
        assert need.cores == pytest.approx(need.per_node / 460)
        assert need.per_gpu == pytest.approx(need.per_node / 8)


def test_stated_gpu_decode_rate_replaces_the_cpu_path():
    gpu = accelerator("h100")
    plans = planner.plan(planner.model_for("L/14", 84), 32_768, 8, gpu)
    best = plans[0]
    per_gpu = planner.input_demand(best, 8, planner.InputSupply()).per_gpu
    slow = planner.InputSupply(cpu_cores_per_node=1000, gpu_decode_rate=per_gpu * 0.9)
    fast = planner.InputSupply(cpu_cores_per_node=0, gpu_decode_rate=per_gpu * 1.1)
    assert planner.input_demand(best, 8, slow).bound  # CPU cores no longer count
    assert not planner.input_demand(best, 8, fast).bound
    summary = planner.input_summary(best, 8, slow)
    assert "GPU decoders supply" in summary and "INPUT-BOUND" in summary
    # The input-bound step: the step time stretched by demand / supply, MFU shrunk alike.
    assert f"{best.time.total / 0.9:.3f} s" in summary


def test_ranked_table_carries_the_input_columns(capsys):
    assert plan_tool.main(["--recipe", "vit_l14", "--stage", "1", "--gpus", "8", "--top", "3",
                           "--cpu-cores-per-node", "32", "--decode-rate-per-core", "950"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("vit_l14 stage 1: OpenVision 2 L/14 @ 84px")
    assert "global batch 32,768 on 8 x H100" in lines[0]
    header = next(line.split() for line in lines if line.split()[:3] == ["#", "TP", "SP"])
    assert header[-3:] == ["img/s/node", "cores", "input"]
    assert "32 CPU cores/node, 24 free" in out and "950 img/s per core" in out
    summary = next(line for line in lines if line.startswith("input of layout 1"))
    # 24 x 950 = 22,800 img/s covers the 18,565 ViT-L/14 stage 1 needs on one node.
    assert "supply 22,800 img/s: ok" in summary


def test_pipeline_stages_put_the_decoding_on_stage_0_nodes():
    """One rank per replica decodes (TP rank 0 of stage 0) and stage 0 holds the first
    world/PP ranks: with TP=2 x PP=2 on 4 nodes, the two stage-0 nodes hold 4 readers each
    and decode the whole global batch between them, twice the per-node average."""
    gpu = accelerator("h100")
    plans = planner.plan(planner.model_for("L/14", 224), 16_384, 32, gpu)
    layout = planner.best_with_layout(plans, ParallelConfig(tensor=2, pipeline=2))
    need = planner.input_demand(layout, 8, planner.InputSupply())
    average = layout.images_per_s / 4  # global img/s over 4 nodes
    assert need.per_node == pytest.approx(2 * average)
    assert need.per_gpu == pytest.approx(layout.images_per_s / layout.data_parallel)
    assert need.per_node == pytest.approx(4 * need.per_gpu)  # 8 GPUs / TP 2 = 4 readers
