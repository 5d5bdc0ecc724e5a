"""tools/bench.py end to end on CPU (a one-entry sweep: the sweep runner starts the benchmark
CLI in its own process, which writes the JSON the merge turns into a table), plus the
report and communication-timing helpers."""

import json
import os
import subprocess
import sys

import pytest

from ov2_megatron.perf import report
from ov2_megatron.perf.comm_timing import exposed_time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    sweep_file = tmp / "sweep.json"
    sweep_file.write_text(json.dumps([{"name": "tiny", "recipe": "tiny_cpu", "steps": 1,
                                       "warmup": 1, "set": ["train.seed=3"]}]))
    out = tmp / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--sweep",
                           str(sweep_file), "--out", str(out)], capture_output=True, text=True,
                          timeout=240, cwd=str(tmp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_benchmark_result(swept):
    out, _ = swept
    result = json.loads((out / "tiny.json").read_text())
    assert result["recipe"] == "tiny_cpu" and result["world"] == 1 and result["steps"] == 1
    assert result["layout"] == dict(tp=1, pp=1, vpp=None, sp=False, dp=1)
    split = result["split_s"]
    assert split["data_wait"] + split["forward_backward"] + split["optimizer"] == \
        pytest.approx(result["step_time_s"])
    assert 0 <= split["exposed_comm"] <= split["forward_backward"] + split["optimizer"]
    assert result["images_per_s"] == pytest.approx(result["global_batch"] / result["step_time_s"])
    assert result["tokens_per_s"] > result["images_per_s"]  # several caption tokens per image
    assert result["mfu"] is None and "no bf16 peak" in result["mfu_basis"]  # CPU
    assert result["tflops_per_device"] > 0
    # The memory reading is the sound one (a pinned child), the timing as training runs, and
    # the memory model agrees with the reading.
    assert "unsound" not in result["memory_method"]
    assert result["timing_allocator"] == ("malloc keeps freed memory for reuse (M_MMAP_MAX=0, "
                                          "M_TRIM_THRESHOLD=2 GiB) (memory read in a pinned "
                                          "child)")
    assert result["peak_memory_gib"] == pytest.approx(result["predicted_memory_gib"], rel=0.15)
    row = report.markdown_row(result)
    assert row.count("|") == report.markdown_header().splitlines()[0].count("|")
    # No shards named: in-memory batches, and the output says so (#23, item 5).
    assert result["data"] == "synthetic" and result["data_source"].startswith(
        "synthetic batches drawn once in memory (random pixels and captions, no loader")


def test_merge_tables_every_result(swept, tmp_path):
    out, stdout = swept
    assert "| tiny |" in stdout and "Commands:" in stdout
    assert "data measured: synthetic batches drawn once in memory" in stdout
    result = json.loads((out / "tiny.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(result))
    result["layout"]["tp"] = 8
    (tmp_path / "b.json").write_text(json.dumps(result))
    (tmp_path / "sweep.json").write_text("[]")  # not a result: ignored
    text = report.merge(str(tmp_path))
    assert (tmp_path / "results.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| a ") or
            line.startswith("| b ")]
    assert len(rows) == 2 and "TP8" in rows[1]


def test_sweep_file_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x", "recipe": "tiny_cpu", "stpes": 3}]))
    with pytest.raises(ValueError, match="unknown keys"):
        report.load_sweep(str(bad))
    bad.write_text(json.dumps([{"name": "x", "recipe": "a"}, {"name": "x", "recipe": "b"}]))
    with pytest.raises(ValueError, match="duplicate"):
        report.load_sweep(str(bad))
    args = report.entry_arguments({"name": "x", "recipe": "vit_l14", "stage": 2,
                                   "set": ["train.micro_batch=64"]})
    assert args[:4] == ["--recipe", "vit_l14", "--stage", "2"]
    assert args[-2:] == ["--set", "train.micro_batch=64"]


def test_exposed_communication_is_comm_not_covered_by_compute():
    comm = [(0, 10), (5, 12), (20, 30)]  # union: [0, 12] + [20, 30] = 22
    compute = [(2, 4), (3, 8), (25, 40)]  # covers 6 of the first, 5 of the second
    assert exposed_time(comm, compute) == pytest.approx(22 - 6 - 5)
    assert exposed_time(comm, []) == pytest.approx(22)
    assert exposed_time([], compute) == 0
