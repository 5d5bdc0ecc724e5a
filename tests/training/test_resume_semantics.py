"""A resume does what the command says, or refuses in one line and changes nothing (#23).

Through the command line (`python -m ov2_megatron.train`), on a 6-step tiny run:
- extended to 10 steps with another LR, it trains steps 7-10 on the command's schedule (the
  checkpoint's, which megatron's scheduler would have kept, ended at LR 0) and says what
  changed;
- a stage 2 pointed at the stage-1 directory, a length that ends before the checkpoint, and a
  tokenizer the checkpoint was not trained with are each refused in one line, exit 2, with
  every file of the run directory byte-identical (config.json was rewritten before);
- a rerun from a checkpoint older than the last logged step logs each step once, in
  metrics.jsonl and TensorBoard (the steps after it appeared twice).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.slurm.jobs import REPO, launcher_env
from tests.slurm.test_torchrun import _clean_env

# ~10 s for a tiny run on a quiet 2-core machine; wide for a loaded CI one.
RUN_TIMEOUT_S = 240
LR, STEPS = 2e-3, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ov2_megatron.data.synthetic import ensure_synthetic_dataset

    cache = tmp_path_factory.mktemp("ov2cache")
    dataset = ensure_synthetic_dataset(str(cache), num_train=256, num_val=32, image_size=32)
    return cache, dataset


def train(data, output, *sets: str, stage: int = 1) -> subprocess.CompletedProcess:
    cache, dataset = data
    args = [sys.executable, "-m", "ov2_megatron.train", "--recipe", "tiny_cpu",
            "--stage", str(stage)]
    for item in (f"data.train_shards={dataset.train_dir}", f"data.val_shards={dataset.val_dir}",
                 f"data.tokenizer_model={dataset.tokenizer_model}", "train.global_batch=8",
                 "train.micro_batch=4", "train.log_interval=1", "train.num_generate=0",
                 "train.linear_probe=false", "train.eval_batches=1", "data.num_threads=1",
                 f"train.output_dir={output}", "train.warmup_steps=1", *sets):
        args += ["--set", item]
    return subprocess.run(args, cwd=REPO, env=_clean_env(**launcher_env(cache)),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 6-step run (checkpoints at steps 3 and 6)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    done = train(data, run, f"train.steps={STEPS}", f"train.lr={LR}", "train.save_interval=3")
    assert done.returncode == 0, done.stdout + done.stderr
    return run


def snapshot(run_dir) -> dict[str, str]:
    """sha256 of every file under `run_dir`, by relative path."""
    out = {}
    for folder, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def metrics(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_an_extended_run_trains_on_the_commands_schedule(data, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = metrics(run)
    assert before[STEPS]["lr"] == 0.0  # the 6-step cosine has ended
    done = train(data, run, "train.steps=10", "train.lr=1e-3")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert ("resume: this command's schedule differs from the checkpoint's (steps 6 -> 10, "
            "peak LR 0.002 -> 0.001); training continues from step 6") in log, log
    after = metrics(run)
    assert sorted(after) == list(range(1, 11))
    for step in range(7, 10):  # the LR logged after step k is the one of step k + 1
        # megatron's cosine after 1 warmup step: lr(k) = peak x (1 + cos(pi (k-1)/9)) / 2
        want = 1e-3 * (1 + math.cos(math.pi * (step - 1) / 9)) / 2
        assert after[step]["lr"] == pytest.approx(want, rel=1e-6), step
    assert after[10]["loss"] < before[STEPS]["loss"] * 1.5  # trained on, not restarted


def test_a_rerun_from_an_earlier_checkpoint_logs_each_step_once(data, finished, tmp_path):
    """As after a crash between step 6's metrics and its checkpoint: `latest` on step 3. The
    rerun trains 4-6 again; metrics.jsonl and TensorBoard keep one record per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.0')  # a line cut by the crash
    done = train(data, run, f"train.steps={STEPS}", f"train.lr={LR}")
    assert done.returncode == 0, done.stdout + done.stderr
    with open(run / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("case", ["stage 2 in the stage-1 directory", "a length before the "
                                  "checkpoint", "another tokenizer"])
def test_a_refused_resume_changes_nothing(data, finished, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    if case == "stage 2 in the stage-1 directory":
        done = train(data, run, f"train.init_from={run}", "train.steps=1", stage=2)
        expected = f"train.output_dir {run} holds a stage-1 run (step 6): --stage 2 there"
    elif case == "a length before the checkpoint":
        done = train(data, run, "train.steps=3")
        expected = "steps 3 (train.steps) ends before step 6, where the checkpoint"
    else:
        done = train(data, run, f"data.tokenizer_model={_other_tokenizer(tmp_path)}")
        expected = "is not the tokenizer that"
    err = done.stderr
    assert done.returncode == 2, done.stdout + err
    [line] = [line for line in err.splitlines() if line.startswith("ov2-train: ")]
    assert expected in line, err
    assert "Traceback" not in err
    assert snapshot(run) == before


def _other_tokenizer(work) -> str:
    """The same 128 pieces with other ids (trained on upper-cased captions)."""
    import numpy as np

    from ov2_megatron.data.synthetic import caption_of, draw_scene
    from ov2_megatron.data.tokenizer import train_tokenizer

    captions = [caption_of(*draw_scene(np.random.default_rng([0, 0, i]))).upper()
                for i in range(256)]
    return train_tokenizer(captions, os.path.join(work, "other"), 128)
