"""`ov2-train --dry-run` checks what a run checks at start-up, with no process group: the
layout for a planned world size, the shards, the tokenizer and the vocabulary; plus the
--set spellings (crop ranges) and the warm-up rule it prints."""

import os
import subprocess
import sys

import pytest

from ov2_megatron.recipes import get_recipe
from ov2_megatron.train import main
from ov2_megatron.training.run_config import (apply_overrides, effective_warmup, lr_rule,
                                              peak_lr, total_steps, validate_run, warmup_rule)
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
    run = apply_overrides(get_recipe("tiny_cpu"), ["train.warmup_steps=30"])
    assert run.train.warmup_samples is None  # the --set replaced the recipe's warmup_samples
    for steps in (31, 300, 3000):
        run.train.samples, run.train.steps = None, steps
        assert effective_warmup(run.train) == 30
    assert warmup_rule(run.train) == "warmup 30 steps (train.warmup_steps)"
    run.train.steps = 20  # too short to hold it: a tenth, said
    assert effective_warmup(run.train) == 2
    assert warmup_rule(run.train).startswith(
        "warmup 2 steps: train.warmup_steps 30 does not fit in the run's 20 steps, so a tenth")
    with pytest.raises(ValueError, match="train.warmup_steps -1 must be >= 0"):
        validate_run(apply_overrides(get_recipe("tiny_cpu"), ["train.warmup_steps=-1"]), 1)


def test_a_warmup_fraction_scales_with_steps_and_is_said():
    run = apply_overrides(get_recipe("tiny_cpu"), ["train.warmup_fraction=0.1"])
    validate_run(run, 1)
    assert effective_warmup(run.train) == 30
    assert warmup_rule(run.train) == "warmup 30 steps (train.warmup_fraction 0.1 of 300 steps)"
    with pytest.raises(ValueError, match="train.warmup_steps 3, train.warmup_fraction 0.1 are "
                                         "both set: keep one"):
        validate_run(apply_overrides(get_recipe("tiny_cpu"), ["train.warmup_steps=3",
                                                              "train.warmup_fraction=0.1"]), 1)


def test_lengths_in_images_and_the_lr_follow_the_global_batch():
    """The official batch rule: steps = samples // global batch (floored), lr = base_lr x
    global batch / 256, warmup likewise; a recipe changed to another batch keeps its images."""
    run = apply_overrides(get_recipe("vit_l14", 1), ["train.global_batch=8192"])
    t = run.train
    assert (t.samples, t.base_lr, t.warmup_samples) == (12_811_670_000, 8e-6, 51_246_680)
    assert total_steps(t) == 1_563_924  # int(12,811,670,000 // 8192), as the official config
    assert peak_lr(t) == pytest.approx(2.56e-4, rel=1e-12)
    assert effective_warmup(t) == 6_255
    stage2 = get_recipe("vit_l14", 2).train
    assert total_steps(stage2) == 1_024_933_600 // 16_384 and peak_lr(stage2) == pytest.approx(
        2.56e-5, rel=1e-12)
    assert get_recipe("vit_1b", 1).train.clip_grad == 0 == stage2.clip_grad
    # A length or LR given the other way replaces the recipe's, said by the rule.
    short = apply_overrides(get_recipe("vit_l14", 1), ["train.steps=10", "train.lr=1e-4"])
    assert (short.train.samples, short.train.base_lr) == (None, None)
    assert (total_steps(short.train), peak_lr(short.train)) == (10, 1e-4)
    assert lr_rule(short.train) == "lr 1.000e-04 (train.lr)"
    with pytest.raises(ValueError, match="train.samples 64, train.steps 3 are both set"):
        validate_run(apply_overrides(get_recipe("tiny_cpu"), ["train.samples=64",
                                                              "train.steps=3"]), 1)
    with pytest.raises(ValueError, match="train.samples 32 is less than one global batch"):
        validate_run(apply_overrides(get_recipe("tiny_cpu"), ["train.samples=32"]), 1)


def test_dry_run_shows_the_official_recipe(capsys):
    assert main(["--recipe", "vit_l14", "--stage", "1", "--dry-run", "--world-size", "8",
                 "--set", "train.global_batch=8192"]) == 0
    out = capsys.readouterr().out
    assert ("schedule: steps 1,563,924 (train.samples 12,811,670,000 // train.global_batch "
            "8192; 12,811,665,408 images), lr 2.560e-04 (train.base_lr 8.000e-06 x "
            "train.global_batch 8192 / 256), warmup 6,255 steps") in out
    assert "clip_grad 0 (no clipping, as the official recipe)" in out
    decayed = next(line for line in out.splitlines() if line.startswith("weight decay 0.2"))
    undecayed = next(line for line in out.splitlines() if line.startswith("no weight decay"))
    assert "decoder.tok_embed.weight" in undecayed and "decoder.tok_embed" not in decayed
    assert "vision.patch_embed.weight" in decayed and "decoder.head.weight" in decayed
    assert "initialisation: model.init official" in out


def test_dry_run_prints_the_warmup_rule(capsys):
    assert main(["--recipe", "tiny_cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("schedule: steps 300 (train.samples 19,200 // train.global_batch 64; 19,200 "
            "images), lr 2.000e-03 (train.base_lr 8.000e-03 x train.global_batch 64 / 256), "
            "warmup 30 steps (train.warmup_samples 1,920 // train.global_batch 64)") in out
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--set", "train.steps=10"]) == 0
    assert ("schedule: steps 10 (train.steps), lr 2.000e-03 (train.base_lr 8.000e-03 x "
            "train.global_batch 64 / 256), warmup 1 steps: 30 steps (train.warmup_samples 1,920 "
            "// train.global_batch 64) does not fit") in capsys.readouterr().out
    assert "data: the synthetic set (8000 train / 256 validation images" in out


def test_dry_run_reads_each_shards_first_samples_and_names_what_training_skips(
        shards, tmp_path, capsys):
    """A cut shard, an all-.JPG shard, a shard of GIFs and a stale index: the dry-run reads the
    first samples of each and says what training would skip, with an example each; before, it
    opened each shard's first header only and passed all of them."""
    from tests.data.shard_factory import gif_bytes, image_bytes, write_img2dataset_shard
    from tests.data.test_shard_edges import cut_inside_last_image

    root = tmp_path / "own"
    root.mkdir()

    def shard(name, ext, image):
        return write_img2dataset_shard(str(root / name), [
            (f"{name[:3]}{i}", {ext: image(i), "txt": b"a red circle"}) for i in range(4)])

    shard("jpg-upper.tar", "JPG", lambda i: image_bytes(i, "JPEG"))
    shard("gif.tar", "jpg", lambda i: gif_bytes())
    cut = shard("cut.tar", "jpg", lambda i: image_bytes(i, "JPEG"))
    cut_inside_last_image(cut)
    stale = shard("stale.tar", "jpg", lambda i: image_bytes(i, "JPEG"))
    with open(stale[:-4] + ".idx", "w") as f:
        f.write("v1.2 1\njpg 512 99 other.jpg\n")
    args = ["--recipe", "tiny_cpu", "--dry-run", "--set", f"data.train_shards={root}",
            "--set", f"data.tokenizer_model={shards.tokenizer_model}",
            "--set", f"data.val_shards={shards.val_dir}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("training shards probed: 4, first samples read: 8, training would skip 2 "
            "(unsupported_image 2, e.g. gif.tar:gif0)") in out
    assert f"training shards cut (an interrupted download or copy?): 1, e.g. {cut}" in out
    assert (f"training index files that no longer match their shard: 1, e.g. "
            f"{stale[:-4]}.idx") in out
    assert "validation shards probed: 2, first samples read: 4, training would skip 0" in out
    # Captions only in .json and no data.caption_key: one line naming the shard and the fix.
    write_img2dataset_shard(str(root / "json.tar"), [
        ("j0", {"jpg": image_bytes(0, "JPEG"), "json": b'{"caption": "x"}'})])
    assert main([*args, "--set", f"data.train_shards={root}/json.tar"]) == 2
    assert "has no .txt caption; its .json has fields ['caption']" in capsys.readouterr().err


def test_dry_run_states_the_loaders_host_memory_and_a_run_that_cannot_hold_it_is_refused(
        shards, tmp_path, capsys):
    """data/loader_memory.py's measured constants applied to the training set's real sample
    count (a stream indexes its share): 360 B per indexed sample, 10 KB per buffered sample. A shuffle buffer of
    10M samples (~93 GiB) does not fit this machine: the dry-run warns, the run refuses
    before any process group, naming data.shuffle_buffer."""
    from ov2_megatron.data.shard_index import samples_in_index

    samples = sum(samples_in_index(os.path.join(shards.train_dir, name))
                  for name in os.listdir(shards.train_dir) if name.endswith(".idx"))
    own = ["--set", f"data.train_shards={shards.train_dir}",
           "--set", f"data.val_shards={shards.val_dir}",
           "--set", f"data.tokenizer_model={shards.tokenizer_model}"]
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--world-size", "2", *own]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("loader memory per reading rank"))
    share = -(-samples // 2)  # world 2 at TP=PP=1: two streams, each indexes its half
    assert f"{share:,} samples indexed x 360 B = {share * 360 / 2**30:.1f} GiB" in line
    assert "shuffle buffer 512 x 10.0 KB" in line and "per node (2 reading rank(s) of 2)" in line
    huge = [*own, "--set", "data.shuffle_buffer=10000000", "--set",
            f"train.output_dir={tmp_path / 'run'}"]
    assert main(["--recipe", "tiny_cpu", "--dry-run", *huge]) == 0
    assert "WARNING: the data loaders would need" in capsys.readouterr().out
    # The run in its own process: a run installs stop-signal handlers.
    done = subprocess.run([sys.executable, "-m", "ov2_megatron.train", "--recipe", "tiny_cpu",
                           *huge], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if "WORLD" not in k})
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    assert "the data loaders would need" in err and "lower data.shuffle_buffer (10,000,000)" in err
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def _samples_in(tars: list[str]) -> int:
    """Samples counted here independently of the loader's code: distinct keys per tar."""
    import tarfile

    total = 0
    for path in tars:
        with tarfile.open(path) as tar:
            total += len({member.name.split(".")[0] for member in tar if member.isfile()})
    return total


def _data_lines(out: str) -> list[str]:
    return [line for line in out.splitlines()
            if line.startswith("data: ") and "samples per step" in line or
            line.startswith("warning: the ")]


def test_dry_run_counts_the_training_samples_and_epochs(shards, capsys):
    """The paper's batch on 72 samples (3 of 4 shards: the last is held out): the count is
    the shards' own, and the line says what the run's length does with it."""
    trained = _samples_in(_tars(shards.train_dir)[:-1])
    assert trained == 72
    assert main(["--recipe", "vit_l14", "--dry-run",
                 "--set", f"data.train_shards={shards.train_dir}",
                 "--set", f"data.tokenizer_model={shards.tokenizer_model}"]) == 0
    line, smaller, repeats = _data_lines(capsys.readouterr().out)
    steps = 12_811_670_000 // 32_768
    epochs = steps * 32_768 / trained
    assert line == (f"data: {trained} training samples (counted in the shards); 32,768 samples "
                    f"per step; {trained / 32_768:.2g} steps per epoch; the run covers "
                    f"{epochs:,.0f} epochs ({steps:,} steps x 32,768 = {steps * 32_768:,} "
                    "samples)")
    assert smaller.startswith("warning: the training set (72 samples) is smaller than one "
                              "global batch (32,768)")
    assert repeats.startswith(f"warning: the run shows each training sample {epochs:,.0f} "
                              "times, more than 50")


def test_dry_run_counts_shards_without_index_files(shards, tmp_path, capsys):
    """img2dataset shards have no DALI index yet: the count lists the tar members instead."""
    import shutil

    tars = sorted(n for n in os.listdir(shards.train_dir) if n.endswith(".tar"))
    for name in tars:
        shutil.copy(os.path.join(shards.train_dir, name), tmp_path / name)
    real = _samples_in([str(tmp_path / n) for n in tars])
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--set", f"data.train_shards={tmp_path}",
                 "--set", f"data.val_shards={shards.val_dir}",
                 "--set", f"data.tokenizer_model={shards.tokenizer_model}",
                 "--set", "train.global_batch=32", "--set", "train.steps=30"]) == 0
    out = capsys.readouterr().out
    assert "index files missing for 4" in out
    assert _data_lines(out) == [
        f"data: {real} training samples (counted in the shards); 32 samples per step; "
        f"{real / 32:.2g} steps per epoch; the run covers {30 * 32 / real:.2g} epochs "
        "(30 steps x 32 = 960 samples)"]  # 96 samples, 10 epochs: no warning


def test_dry_run_counts_each_mixture_source(shards, capsys):
    train, val = _samples_in(_tars(shards.train_dir)), _samples_in(_tars(shards.val_dir))
    mixture = (f'[{{"path": "{shards.train_dir}", "weight": 3}}, '
               f'{{"path": "{shards.val_dir}", "weight": 1}}]')
    assert main(["--recipe", "tiny_cpu", "--dry-run", "--set", f"data.train_shards={mixture}",
                 "--set", f"data.tokenizer_model={shards.tokenizer_model}",
                 "--set", "train.steps=100"]) == 0
    out = capsys.readouterr().out.splitlines()
    sources = [line for line in out if line.startswith("data: /")]
    assert sources == [
        f"data: {shards.train_dir}: {train} samples, 75.0% of each batch: the run covers "
        f"{6400 * 0.75 / train:.2g} epochs of it",
        f"data: {shards.val_dir}: {val} samples, 25.0% of each batch: the run covers "
        f"{6400 * 0.25 / val:.2g} epochs of it"]
    assert f"data: {train + val} training samples (counted in the shards)" in "\n".join(out)


def test_dry_run_states_the_synthetic_set_from_its_config(capsys):
    assert main(["--recipe", "tiny_cpu", "--dry-run"]) == 0  # synthetic num_train 8000
    assert _data_lines(capsys.readouterr().out) == [
        "data: 8,000 training samples (the synthetic set: synthetic.num_train in the config); "
        "64 samples per step; 125 steps per epoch; the run covers 2.4 epochs (300 steps x 64 "
        "= 19,200 samples)"]


def _tars(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".tar"))
