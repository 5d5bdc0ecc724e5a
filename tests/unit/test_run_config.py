"""Recipes validate before any compute; --set overrides are typed; bad settings are named."""

import pytest

from ov2_megatron.recipes import RECIPES, get_recipe
from ov2_megatron.train import main
from ov2_megatron.training.run_config import apply_overrides, validate_run

WORLD = {"tiny_cpu": 1, "vit_l14": 8, "vit_1b": 16}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("stage", [1, 2])
def test_every_recipe_stage_validates(name, stage):
    run = get_recipe(name, stage)
    geom = validate_run(run, WORLD[name])
    assert geom.vit_seq % (run.parallel.tensor if run.parallel.sequence_parallel else 1) == 0
    assert (stage == 2) == bool(run.train.init_from)
    assert run.data.resolution == run.model.vision.image_size
    # the official recipe's optimizer and initialisation in every recipe, tiny_cpu included
    assert (run.model.init, run.train.clip_grad) == ("official", 0.0)
    assert run.train.samples and run.train.base_lr and run.train.warmup_samples is not None


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.tensor=3"], 3, "vision heads 16 not divisible by tensor-parallel size 3"),
    ([], 3, "world size 3 is not divisible by parallel.tensor (2)"),
    (["train.global_batch=100"], 16, "train.global_batch 100 is not divisible"),
    (["data.resolution=224"], 16, "data.resolution 224 != model.vision.image_size 84"),
    (["train.precision=fp16"], 16, "train.precision 'fp16': use bf16 or fp32"),
    (["model.vision.keep_ratio=0"], 16, "vision.keep_ratio 0.0 must be in (0, 1]"),
])
def test_bad_settings_fail_before_compute(overrides, world, message):
    with pytest.raises(ValueError) as info:
        validate_run(apply_overrides(get_recipe("vit_1b"), overrides), world)
    assert message in str(info.value)


def test_overrides_are_typed_and_unknown_keys_named():
    run = apply_overrides(get_recipe("tiny_cpu"), [
        "train.steps=7", "train.lr=0.5", "parallel.sequence_parallel=true",
        "data.crop_scale=0.5,1.0", "model.fp8=none", "train.output_dir=/x"])
    assert (run.train.steps, run.train.lr, run.parallel.sequence_parallel) == (7, 0.5, True)
    assert run.data.crop_scale == (0.5, 1.0) and run.model.fp8 is None
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        apply_overrides(get_recipe("tiny_cpu"), ["train.stepz=3"])
    with pytest.raises(ValueError, match="train.steps=many"):
        apply_overrides(get_recipe("tiny_cpu"), ["train.steps=many"])


def test_dry_run_prints_layout_and_parameters(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert main(["--recipe", "vit_1b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layout: world 16 = TP 2 x PP 1 x DP 8" in out
    assert "(world size from $WORLD_SIZE)" in out  # the fallback when no --world-size is given
    assert "parameters: encoder 1,010,839,168" in out  # g/14: padding adds no parameters
    assert "alignment: ViT sequence padded 37 -> 38 (a multiple of 2)" in out
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--recipe", "vit_1b", "--dry-run"]) == 2
    assert "configuration error: world size 3" in capsys.readouterr().err
