"""The progress line through the real training loop (issue 23, item 5): logging every 2nd
step, each record's `loss_mean` is the mean of the per-step losses of its interval (read off
the loop's own train_step), the per-step fields keep their meaning, and every printed line,
in a log file, carries the time and the ETA."""

import contextlib
import io
import json
import os
import re

import pytest

from tests.harness import run_distributed
from tests.training.test_resume import tiny


@pytest.fixture(scope="module", autouse=True)
def dataset_cache(tmp_path_factory):
    os.environ["OV2_CACHE"] = str(tmp_path_factory.mktemp("ov2cache"))
    yield


def train_rank(output_dir: str) -> tuple[str, list[float]]:
    """Train tiny (4 steps, logged at 1, 2 and 4); returns the output and every step's loss."""
    from ov2_megatron.training import loop

    losses, original = [], loop.train_step

    def recorded_step(*args, **kwargs):
        out = original(*args, **kwargs)
        losses.append(out[0])
        return out

    loop.train_step = recorded_step
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        loop.train(tiny(output_dir, ["train.log_interval=2"]))
    return out.getvalue(), losses


def test_logged_means_are_the_means_of_the_steps(tmp_path):
    output_dir = str(tmp_path / "run")
    printed, losses = run_distributed(train_rank, 1, args=(output_dir,), timeout=300)[0]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    assert sorted(records) == [1, 2, 4] and len(losses) == 4
    for step, first in ((1, 1), (2, 2), (4, 3)):  # each interval starts after the last log
        record, steps = records[step], losses[first - 1:step]
        assert record["loss"] == losses[step - 1]  # the step's own value, as before
        assert record["interval_steps"] == len(steps)
        assert record["loss_mean"] == pytest.approx(sum(steps) / len(steps), rel=1e-12)
        # one global batch of 8 per step: images/s over the interval = 8 / mean step time
        assert record["images_per_s_mean"] == pytest.approx(8 / record["step_s_mean"], rel=1e-9)
    assert records[4]["loss_mean"] != records[4]["loss"]  # two different steps' losses
    lines = [line for line in printed.splitlines() if "| step " in line]
    assert len(lines) == 4  # steps 1, 2, 4 and the final validation
    assert (f"| step 4/4 (means over steps 3-4) | loss_mean {records[4]['loss_mean']:.4f} | "
            in lines[2])
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line)
        assert re.search(r"\| ETA \d+:\d\d:\d\d$", line)
    assert all("nonfinite_steps_skipped 0" in line for line in lines[:3])
    assert lines[2].endswith("| ETA 0:00:00") and "| val_loss " in lines[3]
