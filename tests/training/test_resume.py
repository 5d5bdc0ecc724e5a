"""Checkpoint and resume through the real training loop, data pipeline included:
- a run stopped by a preemption signal and resumed in fresh processes continues with the very
  same losses (bitwise, fp32) as an uninterrupted run, at DP=2 with the distributed optimizer;
- a crash in the middle of a save leaves `latest` on the previous checkpoint, and the next
  start removes the partial directory and resumes;
- a checkpoint written at TP=2 resumes at PP=2 (another layout) with the same weights.
"""

import json
import os

import pytest
import torch

from tests.harness import run_distributed

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def dataset_cache(tmp_path_factory):
    os.environ["OV2_CACHE"] = str(tmp_path_factory.mktemp("ov2cache"))
    yield


def tiny(output_dir: str, extra=()):
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.run_config import apply_overrides

    run = get_recipe("tiny_cpu")
    run.synthetic = dict(num_train=256, num_val=32, image_size=32, seed=0, vocab_size=128)
    return apply_overrides(run, [
        f"train.output_dir={output_dir}", f"train.steps={STEPS}", "train.global_batch=8",
        "train.micro_batch=2", "train.save_interval=2", "train.log_interval=1",
        "train.warmup_steps=1", "train.eval_batches=1", "train.num_generate=0",
        "train.linear_probe=false", "data.num_threads=1", *extra])


def train_rank(output_dir: str, stop_after: int | None = None, extra=(),
               fail_rename_at: int | None = None):
    from ov2_megatron.training import checkpoint, loop

    if stop_after is not None:  # as if SIGUSR1 arrived during step `stop_after`
        steps_done = []
        original = loop.StopRequested.agreed

        def agreed(self):
            steps_done.append(1)
            return len(steps_done) >= stop_after or original(self)

        loop.StopRequested.agreed = agreed
    if fail_rename_at is not None:  # a crash between writing and publishing a checkpoint
        real_replace = checkpoint.os.replace

        def replace(src, dst):
            if src.endswith(f"step_{fail_rename_at:08d}.partial"):
                raise OSError("simulated crash during checkpoint save")
            return real_replace(src, dst)

        checkpoint.os.replace = replace
    return loop.train(tiny(output_dir, extra))


def losses(output_dir: str) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_preempted_run_resumes_bitwise_at_dp2(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_distributed(train_rank, 2, args=(straight,), timeout=300)
    first = run_distributed(train_rank, 2, args=(resumed, 1), timeout=300)
    assert first[0]["preempted"] and first[0]["step"] == 1
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["latest", "step_00000001"]
    run_distributed(train_rank, 2, args=(resumed,), timeout=300)
    want, got = losses(straight), losses(resumed)
    assert sorted(want) == list(range(1, STEPS + 1)) and sorted(got) == sorted(want)
    assert want[STEPS] < want[1]
    for step in want:
        assert got[step] == want[step], (step, got[step], want[step])  # bitwise


def test_crash_during_save_keeps_latest_on_the_last_complete_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Exception, match="simulated crash during checkpoint save"):
        run_distributed(train_rank, 1, args=(out, None, (), 4), timeout=300)
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step_00000002"
    assert "step_00000004.partial" in os.listdir(root)
    result = run_distributed(train_rank, 1, args=(out,), timeout=300)[0]
    assert result["step"] == STEPS
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000004"]


def train_rank_printing(output_dir: str) -> tuple[dict, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train_rank(output_dir)
    return result, out.getvalue()


def test_a_rerun_after_an_interrupted_first_save_says_it_starts_over(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Exception, match="simulated crash during checkpoint save"):
        run_distributed(train_rank, 1, args=(out, None, (), 2), timeout=300)
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step_00000002.partial"]
    result, printed = run_distributed(train_rank_printing, 1, args=(out,), timeout=300)[0]
    assert result["step"] == STEPS
    assert (f"resume: no complete checkpoint in {out}/checkpoints (the save of "
            "step_00000002.partial was interrupted): starting from step 0") in printed
    with open(os.path.join(out, "metrics.jsonl")) as f:  # each step once, not 1, 2, 1, 2, ...
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == \
            list(range(1, STEPS + 1))


def weights_after_restore(output_dir: str, tp: int, pp: int):
    from megatron.core.utils import unwrap_model

    from ov2_megatron.models import state_dict_adapter
    from ov2_megatron.training import loop
    from tests.distributed import tp_gather

    run = tiny(output_dir, [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])
    geom, _, model, optimizer, scheduler = loop.setup(run)
    step, _ = loop._restore(run, model, optimizer, scheduler, geom)
    state = {}
    for chunk in model:
        inner = unwrap_model(chunk)
        state.update(state_dict_adapter.to_standard(tp_gather.full_state(inner), inner.plan,
                                                    4, 4, run.model.decoder.vocab_size))
    return step, state


def test_tp2_checkpoint_resumes_at_pp2_with_the_same_weights(tmp_path):
    out = str(tmp_path / "run")
    run_distributed(train_rank, 2, args=(out, 2, ["parallel.tensor=2"]), timeout=300)
    saved = run_distributed(weights_after_restore, 2, args=(out, 2, 1), timeout=300)[0]
    ranks = run_distributed(weights_after_restore, 2, args=(out, 1, 2), timeout=300)
    assert saved[0] == 2 and all(step == 2 for step, _ in ranks)
    merged = {**ranks[0][1], **ranks[1][1]}  # the two stages hold disjoint tensors
    assert merged.keys() == saved[1].keys()
    for name, tensor in saved[1].items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)
