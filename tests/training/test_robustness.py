"""Training-loop safety nets: non-finite losses skip their step and K in a row stop the run
with a checkpoint of the last good weights; stage 2 starts from stage-1 weights with a
learned position table resized to the new resolution."""

import os

import pytest
import torch

from tests.harness import DistributedFailure, run_distributed
from tests.training.test_resume import dataset_cache, tiny  # noqa: F401 (fixture)


def nan_at_steps_2_and_3(output_dir: str):
    from ov2_megatron.training import loop

    real, calls = loop.run_schedule, []

    def poisoned(*args, **kwargs):
        totals = real(*args, **kwargs)  # the real collectives still run on every rank
        calls.append(1)
        if len(calls) in (2, 3):
            totals[0] = float("nan")
        return totals

    loop.run_schedule = poisoned
    return loop.train(tiny(output_dir, ["train.max_nonfinite=2", "train.save_interval=1"]))


def plain_weights(step_dir: str):
    from megatron.core import dist_checkpointing

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(), seed=0)
    return dist_checkpointing.load_plain_tensors(step_dir)


def test_nonfinite_losses_skip_steps_then_stop_with_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(DistributedFailure, match="2 non-finite losses in a row at step 3"):
        run_distributed(nan_at_steps_2_and_3, 1, args=(out,), timeout=300)
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step_00000003"
    first = run_distributed(plain_weights, 1, args=(os.path.join(root, "step_00000001"),))[0]
    last = run_distributed(plain_weights, 1, args=(os.path.join(root, "step_00000003"),))[0]
    assert first.keys() == last.keys() and len(first) > 10
    for key in first:  # both poisoned steps left the weights alone
        torch.testing.assert_close(last[key], first[key], rtol=0, atol=0)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert '"skipped": 1' in f.read()


def stage_two_from_stage_one(stage1: str, stage2: str):
    from megatron.core.utils import unwrap_model

    from ov2_megatron.models import state_dict_adapter
    from ov2_megatron.models.vision_encoder import interpolate_pos_embed
    from ov2_megatron.training import loop
    from tests.distributed import tp_gather

    learned = ["model.vision.pos_embed=learned", "model.vision.image_size=32",
               "data.resolution=32"]
    loop.train(tiny(stage1, [*learned, "train.steps=1"]))

    def standard(model, vocab):
        inner = unwrap_model(model[0])
        return state_dict_adapter.to_standard(tp_gather.full_state(inner), inner.plan, 4, 4, vocab)

    from ov2_megatron.parallel.initialize import shutdown

    run1 = tiny(stage1, [*learned, "train.steps=1"])
    geom1, _, model1, opt1, sched1 = loop.setup(run1)
    loop._restore(run1, model1, opt1, sched1, geom1)
    before = standard(model1, run1.model.decoder.vocab_size)
    shutdown()
    run2 = tiny(stage2, ["model.vision.pos_embed=learned", "model.vision.image_size=48",
                         "data.resolution=48", f"train.init_from={stage1}"])
    geom2, _, model2, opt2, sched2 = loop.setup(run2)
    step, _ = loop._restore(run2, model2, opt2, sched2, geom2)
    after = standard(model2, run2.model.decoder.vocab_size)
    expected_pos = interpolate_pos_embed(before["vision.pos_embed"], 6)
    return step, before, after, expected_pos


def test_stage_two_starts_from_stage_one_with_resized_positions(tmp_path):
    step, before, after, expected_pos = run_distributed(
        stage_two_from_stage_one, 1, args=(str(tmp_path / "s1"), str(tmp_path / "s2")),
        timeout=300)[0]
    assert step == 0  # a fresh schedule
    assert before["vision.pos_embed"].shape[0] == 16 and after["vision.pos_embed"].shape[0] == 36
    torch.testing.assert_close(after["vision.pos_embed"], expected_pos, rtol=0, atol=0)
    for name, value in before.items():
        if name != "vision.pos_embed":
            torch.testing.assert_close(after[name], value, rtol=0, atol=0)
