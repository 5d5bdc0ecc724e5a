"""`sbatch launch/vit_1b.slurm` on a real one-node Slurm, with the tiny CPU recipe on 2 tasks:
a run to completion, a SIGUSR1 checkpoint + self-requeue + resume, and bad overrides that fail
in the preflight. Each test reads the job's state, its log and the run directory."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.slurm.jobs import CPU_JOB, REPO, TINY_ARGS, latest, launcher_env, train_steps

pytestmark = pytest.mark.slurm

VIT_1B = str(REPO / "launch" / "vit_1b.slurm")


def test_runs_to_completion_with_layout_override(slurm, tiny_cache, tmp_path):
    """Submitted from elsewhere (OV2_ROOT), default per-job log and run directory; the layout
    override OV2_TP=2 OV2_SP=true runs the vit_1b layout (TP=2 + SP) on the 2 tasks."""
    env = slurm.env(**launcher_env(tiny_cache), OV2_ROOT=str(REPO), OV2_STEPS="4",
                    OV2_TP="2", OV2_SP="true")
    job = slurm.sbatch([*CPU_JOB, VIT_1B, *TINY_ARGS, "--set", "train.save_interval=2"],
                       cwd=tmp_path, env=env)
    info = slurm.wait_job(job, timeout=180)
    log = slurm.job_log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert info["StdOut"] == str(tmp_path / f"ov2-vit_1b-{job}.out")

    run = tmp_path / "runs" / f"tiny_cpu-stage1-{job}"
    assert "preflight: layout: world 2 = TP 2 x PP 1 x DP 1; VPP None; SP True" in log, log
    assert "layout TP2 PP1 DP1" in log, log  # the training ranks' own start-up line
    assert latest(run) == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000004"]
    assert (run / "checkpoints" / "step_00000004" / "meta.json").is_file()
    assert train_steps(run) == [1, 2, 3, 4]


def test_usr1_checkpoints_requeues_and_resumes(slurm, tiny_cache, tmp_path):
    """Submitted from the repository root as in the README. SIGUSR1 to the batch shell (what
    --signal=B:USR1@N sends before the time limit) -> the ranks checkpoint and exit -> the
    script requeues the job -> the next run of the same job resumes and finishes."""
    steps, run = 20, tmp_path / "run"
    env = slurm.env(**launcher_env(tiny_cache), OV2_STEPS=str(steps), OV2_OUTPUT_DIR=str(run))
    job = slurm.sbatch([*CPU_JOB, f"--output={tmp_path}/%x-%j.out", VIT_1B, *TINY_ARGS,
                        "--set", "train.save_interval=4"], cwd=REPO, env=env)

    # Signal once training is under way (its first periodic checkpoint exists).
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").exists():
        info = slurm.job(job)
        assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), slurm.job_log(info)
        assert time.monotonic() < deadline, slurm.job_log(info)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=env, check=True)

    info = slurm.wait_job(job, timeout=180)  # through PENDING (requeued) to an end state
    log = slurm.job_log(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log

    stopped = re.search(r"stop signal 10: checkpoint saved at step (\d+)", log)
    assert stopped, log
    stop_step = int(stopped.group(1))
    assert 4 <= stop_step < steps, log
    assert "SIGUSR1 received: asking the training ranks to checkpoint and stop" in log, log
    assert f"requeueing job {job} (restart 1)" in log, log
    assert (f"requeued run (restart 1): resuming from {run}/checkpoints/latest "
            f"(step_{stop_step:08d})") in log, log
    assert f"steps {stop_step}->{steps}" in log, log  # the resumed ranks' start-up line
    assert log.count("preflight: validating") == 1, log  # not repeated on the requeued run
    # The first run logged steps 1..stop_step, the resumed one the rest: no gap, no repeat.
    assert train_steps(run) == list(range(1, steps + 1))
    assert latest(run) == f"step_{steps:08d}"


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor=3", "world size 2 is not divisible by parallel.tensor (3)"),
    ("train.stepz=5", "--set train.stepz: unknown key 'stepz'"),
], ids=["layout", "unknown-key"])
def test_bad_override_fails_fast_in_preflight(slurm, tiny_cache, tmp_path, override, message):
    run = tmp_path / "run"
    env = slurm.env(**launcher_env(tiny_cache), OV2_OUTPUT_DIR=str(run))
    job = slurm.sbatch([*CPU_JOB, f"--output={tmp_path}/%x-%j.out", VIT_1B, *TINY_ARGS,
                        "--set", override], cwd=REPO, env=env)
    info = slurm.wait_job(job, timeout=90)
    log = slurm.job_log(info)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert log.count(f"ov2-train: configuration error: {message}") == 1, log
    assert "preflight failed (exit 2)" in log, log
    assert "launching training" not in log, log
    assert not (run / "checkpoints").exists()
    hours, minutes, seconds = map(int, info["RunTime"].split(":"))
    assert hours * 3600 + minutes * 60 + seconds < 60, info["RunTime"]
