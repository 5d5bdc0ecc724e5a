"""`launch/torchrun.sh 2 ...` on CPU: two gloo processes train, SIGUSR1 to the script makes the
workers save a checkpoint and exit 0, and rerunning the same command resumes and finishes.
Needs no Slurm."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from tests.slurm.jobs import REPO, TINY_ARGS, latest, launcher_env, train_steps


def _clean_env(**extra: str) -> dict[str, str]:
    """Without an outer job's rank variables, which would override torchrun's."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def test_torchrun_two_cpu_processes_stop_and_resume(tiny_cache, tmp_path):
    steps, run = 16, tmp_path / "run"
    env = _clean_env(**launcher_env(tiny_cache), OV2_OUTPUT_DIR=str(run), OV2_STEPS=str(steps))
    command = [str(REPO / "launch" / "torchrun.sh"), "2", *TINY_ARGS,
               "--set", "train.save_interval=4"]

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None, first_log.read_text()
            assert time.monotonic() < deadline, first_log.read_text()
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = first_log.read_text()
    assert returncode == 0, log
    assert "torchrun: 2 processes, CPU (gloo)" in log, log
    assert "SIGUSR1 received: asking the workers to checkpoint and stop" in log, log
    stopped = re.search(r"stop signal 10: checkpoint saved at step (\d+)", log)
    assert stopped, log
    stop_step = int(stopped.group(1))
    assert 4 <= stop_step < steps, log
    assert latest(run) == f"step_{stop_step:08d}"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                            start_new_session=True)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log
    assert f"steps {stop_step}->{steps}" in log, log
    assert latest(run) == f"step_{steps:08d}"
    assert train_steps(run) == list(range(1, steps + 1))
