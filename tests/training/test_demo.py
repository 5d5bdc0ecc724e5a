"""`make demo` end to end, shortened: ov2_megatron.demo.main trains both stages of tiny_cpu
(stage 2 from stage 1's weights) on a smaller synthetic set and prints its summary. The
printed numbers must be the run's own (metrics.jsonl, the stage-2 checkpoint's step). The
full demo takes minutes; this guards the command against breaking (it once failed on an
import for a whole session without a test noticing)."""

import contextlib
import io
import json
import os

import pytest

from tests.harness import run_distributed
from tests.training.test_resume import dataset_cache  # noqa: F401 (fixture)

STEPS = 3


def demo_rank(output: str) -> tuple[int, str]:
    from ov2_megatron import demo, recipes

    full = recipes.get_recipe

    def smaller_set(name, stage=1):  # the recipe's own synthetic set, fewer images
        run = full(name, stage)
        run.synthetic = dict(run.synthetic, num_train=256, num_val=64)
        return run

    recipes.get_recipe = smaller_set
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(["--output", output, "--set", f"train.steps={STEPS}",
                          "--set", "train.save_interval=100", "--set", "train.log_interval=1",
                          "--set", "train.eval_batches=1"])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "runs"
    code, printed = run_distributed(demo_rank, 1, args=(str(output),), timeout=600)[0]
    return output, code, printed


def _metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_trains_both_stages_and_prints_their_numbers(demo):
    output, code, printed = demo
    assert code == 0, printed[-3000:]
    losses = [r["loss"] for r in _metrics(output / "stage1" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS
    assert (f"stage 1 training loss: {losses[0]:.3f} at step 1 -> {losses[-1]:.3f} at the end"
            in printed), printed[-3000:]
    for stage in ("stage1", "stage2"):
        with open(output / stage / "checkpoints" / "latest") as f:
            assert f.read().strip() == f"step_{STEPS:08d}"
    stage2 = _metrics(output / "stage2" / "metrics.jsonl")
    # Stage 2 starts from stage 1's weights: its first loss is near stage 1's last, far below
    # a fresh model's (5.48 at step 1 here; ln 128 = 4.85).
    first2 = next(r["loss"] for r in stage2 if "loss" in r)
    assert first2 < 0.8 * losses[0], (first2, losses)
    [val] = [r for r in stage2 if "val_loss" in r]
    assert (f"stage 2 validation caption loss: {val['val_loss']:.3f} with the right images vs "
            f"{val['val_loss_wrong_images']:.3f} with the wrong ones (token accuracy "
            f"{val['val_token_accuracy']:.1%})" in printed), printed[-3000:]
    assert f"checkpoints in {output}/stage*/checkpoints" in printed
