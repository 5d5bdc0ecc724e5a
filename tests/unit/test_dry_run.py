"""`ov2-train --dry-run` checks what a run checks at start-up, with no process group: the
layout for a planned world size, the shards, the tokenizer and the vocabulary; plus the
--set spellings (crop ranges) and the warm-up rule it prints."""

import os

import pytest

from ov2_megatron.recipes import get_recipe
from ov2_megatron.train import main
from ov2_megatron.training.run_config import (apply_overrides, effective_warmup, validate_run,
                                              warmup_rule)
from tests.data.shard_factory import synthetic_dataset


@pytest.fixture(scope="module")
def shards():
    return synthetic_dataset()


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("flags", [["--world-size", "8"],
                                   ["--nodes", "2", "--gpus-per-node", "4"]])
def test_a_planned_world_is_checked_without_process_groups(flags, capsys):
    assert main(["--recipe", "vit_1b", "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    assert "layout: world 8 = TP 2 x PP 1 x DP 4" in out
    assert "(world size from --" in out
    assert "data: NOT CHECKED: data.train_shards is empty" in out


def test_a_world_the_layout_does_not_divide_fails_naming_the_field(capsys):
    assert main(["--recipe", "vit_1b", "--dry-run", "--world-size", "7"]) == 2
    assert "world size 7 is not divisible by parallel.tensor (2)" in capsys.readouterr().err
    assert main(["--recipe", "vit_l14", "--dry-run", "--world-size", "8",
                 "--set", "parallel.pipeline=3"]) == 2
    assert "parallel.pipeline (3)" in capsys.readouterr().err


def test_world_flags_only_plan_a_dry_run(capsys):
    assert main(["--recipe", "vit_1b", "--world-size", "8"]) == 2
    assert "only plans a --dry-run" in capsys.readouterr().err
    assert main(["--recipe", "vit_1b", "--dry-run", "--nodes", "2"]) == 2
    assert "--gpus-per-node" in capsys.readouterr().err


def test_dry_run_checks_shards_tokenizer_and_vocabulary(shards, capsys):
    own = ["--set", f"data.train_shards={shards.train_dir}",
           "--set", f"data.tokenizer_model={shards.tokenizer_model}"]
    assert main(["--recipe", "vit_l14", "--dry-run", "--world-size", "8", *own]) == 0
    out = capsys.readouterr().out
    assert "validation: held out the last training shard" in out
    assert "vocabulary: model.decoder.vocab_size 128 from the tokenizer" in out
    assert '"vocab_size": 128' in out
    assert main(["--recipe", "vit_l14", "--dry-run", *own,
                 "--set", "model.decoder.vocab_size=32000"]) == 2
    assert "does not match the 128 pieces" in capsys.readouterr().err
    missing = os.path.join(shards.root, "nowhere-*.tar")
    assert main(["--recipe", "vit_l14", "--dry-run", *own,
                 "--set", f"data.val_shards={missing}"]) == 2
    assert "matched no files" in capsys.readouterr().err
    assert main(["--recipe", "vit_l14", "--dry-run", *own[:2],
                 "--set", "data.tokenizer_model=/nonexistent.model"]) == 2
    assert "tokenizer model /nonexistent.model does not exist" in capsys.readouterr().err


def test_dry_run_refuses_a_validation_set_smaller_than_dp(shards, capsys):
    val = sorted(os.path.join(shards.val_dir, n) for n in os.listdir(shards.val_dir)
                 if n.endswith(".tar"))[0]  # 24 samples
    args = ["--recipe", "tiny_cpu", "--dry-run", "--set", f"data.train_shards={shards.train_dir}",
            "--set", f"data.tokenizer_model={shards.tokenizer_model}",
            "--set", f"data.val_shards={val}", "--set", "train.global_batch=1024"]
    assert main([*args, "--world-size", "32"]) == 2
    assert "has 24 sample(s) but the data-parallel size is 32" in capsys.readouterr().err
    assert main([*args, "--world-size", "16"]) == 0


@pytest.mark.parametrize("spelling", ["(0.5,1.0)", "(0.5, 1.0)", "0.5,1.0", "[0.5,1.0]"])
def test_crop_scale_takes_the_printed_form(spelling):
    run = apply_overrides(get_recipe("tiny_cpu"), [f"data.crop_scale={spelling}"])
    assert run.data.crop_scale == (0.5, 1.0)


def test_a_bare_crop_scale_is_refused_showing_the_accepted_form(capsys):
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--set", "data.crop_scale=0.5"]) == 2
    err = capsys.readouterr().err
    assert "data.crop_scale=0.5: expected 2 comma-separated values, e.g. (0.5,1.0) or 0.5,1.0" \
        in err
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--set", "data.crop_scale=0.5,2"]) == 2
    assert "DataConfig.crop_scale (0.5, 2.0) is invalid" in capsys.readouterr().err


def test_help_keys_document_the_spellings(capsys):
    assert main(["--recipe", "tiny_cpu", "--help-keys"]) == 0
    out = capsys.readouterr().out
    assert "--set synthetic=none switches it off" in out
    assert "data.crop_scale = (0.8, 1.0)    # as printed, (0.5,1.0), or 0.5,1.0" in out
    assert "explicit" not in out


def test_warmup_is_absolute_and_never_changes_with_steps():
    run = get_recipe("tiny_cpu")  # warmup_steps 30
    for steps in (31, 300, 3000):
        run.train.steps = steps
        assert effective_warmup(run.train) == 30
    assert warmup_rule(run.train) == "warmup 30 steps (train.warmup_steps)"
    run.train.steps = 20  # too short to hold it: a tenth, said
    assert effective_warmup(run.train) == 2
    assert warmup_rule(run.train).startswith(
        "warmup 2 steps: train.warmup_steps 30 does not fit in train.steps 20, so a tenth")
    with pytest.raises(ValueError, match="train.warmup_steps -1 must be >= 0"):
        validate_run(apply_overrides(get_recipe("tiny_cpu"), ["train.warmup_steps=-1"]), 1)


def test_a_warmup_fraction_scales_with_steps_and_is_said():
    run = apply_overrides(get_recipe("tiny_cpu"),
                          ["train.warmup_steps=none", "train.warmup_fraction=0.1"])
    validate_run(run, 1)
    assert effective_warmup(run.train) == 30
    assert warmup_rule(run.train) == "warmup 30 steps (train.warmup_fraction 0.1 of 300 steps)"
    with pytest.raises(ValueError, match="are both set: keep one"):
        validate_run(apply_overrides(get_recipe("tiny_cpu"), ["train.warmup_fraction=0.1"]), 1)


def test_dry_run_prints_the_warmup_rule(capsys):
    assert main(["--recipe", "tiny_cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "schedule: 300 steps, warmup 30 steps (train.warmup_steps)" in out
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--set", "train.steps=10"]) == 0
    assert "schedule: 10 steps, warmup 1 steps: train.warmup_steps 30 does not fit" in \
        capsys.readouterr().out
    assert "data: the synthetic set (8000 train / 256 validation images" in out
