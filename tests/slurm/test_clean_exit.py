"""No process outlives its run, and stop signals end runs cleanly from their first second:
- a SIGKILLed rank takes its checkpoint-writer helper (the Manager), a forked write worker (as
  megatron 0.16 forks per save) and multiprocessing's resource tracker with it;
- SIGTERM while the trainer is still importing torch: exit 0 with a one-line note, no traceback;
- plain `torchrun` (not launch/torchrun.sh): SIGTERM to the agent makes the workers checkpoint
  and exit 0 (the agent itself exits 1: torchrun's doing); SIGUSR1 or SIGKILL kill the agent,
  and its orphaned workers notice, checkpoint and exit instead of training on unsupervised.
Needs no Slurm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.slurm.jobs import REPO, TINY_ARGS, latest, launcher_env
from tests.slurm.test_torchrun import _clean_env

HELPERS = textwrap.dedent("""
    import multiprocessing, time

    import psutil

    from ov2_megatron.training import checkpoint

    def write_worker():
        time.sleep(600)

    if __name__ == "__main__":
        checkpoint.start_writer_shielded()
        # megatron 0.16 forks its write workers from the rank during each save
        multiprocessing.get_context("fork").Process(target=write_worker).start()
        children = psutil.Process().children(recursive=True)
        print(" ".join(str(p.pid) for p in children), flush=True)
        time.sleep(600)
""")


def gone(pids, within_s: float) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkilled_rank_leaves_no_helper_behind(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(HELPERS)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    children = []
    try:
        children = [int(pid) for pid in proc.stdout.readline().split()]
        names = [" ".join(psutil.Process(pid).cmdline()) for pid in children]
        assert len(children) >= 3, names  # resource tracker, Manager, forked write worker
        assert any("resource_tracker" in name for name in names), names
        assert all(psutil.Process(pid).ppid() == proc.pid for pid in children), names
        proc.kill()
        proc.wait()
        assert gone(children, within_s=5) == [], names
    finally:
        kill_all([proc.pid, *children])


def test_sigterm_while_importing_exits_cleanly(tiny_cache, tmp_path):
    env = _clean_env(**launcher_env(tiny_cache))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ov2_megatron.train", "--recipe", "tiny_cpu", *TINY_ARGS,
         "--set", f"train.output_dir={tmp_path / 'run'}"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside main, long before torch and megatron are imported
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err, err
    assert ("SIGTERM before training started: nothing to save" in err
            or "checkpoint saved" in out), out + err


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def training_steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_plain_torchrun_agent_signal_checkpoints_and_leaves_nothing(tiny_cache, tmp_path, sig):
    run, log_path, steps = tmp_path / "run", tmp_path / "torchrun.log", 200
    # The agent SIGKILLs its workers 30 s after forwarding SIGTERM unless told otherwise; a
    # loaded CI machine may need longer for a step and a save.
    env = _clean_env(**launcher_env(tiny_cache), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "ov2_megatron.train", "--recipe", "tiny_cpu",
               *TINY_ARGS, "--set", f"train.output_dir={run}", "--set", f"train.steps={steps}",
               "--set", "train.save_interval=1000"]
    with open(log_path, "w") as log:
        agent = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    tree = []
    try:
        deadline = time.monotonic() + 240
        while training_steps_logged(run) < 2:
            assert agent.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        tree = descendants(agent.pid)  # workers, their writer Managers and resource trackers
        assert len(tree) >= 6, tree
        os.kill(agent.pid, sig)
        agent.wait(timeout=120)
        assert gone(tree, within_s=120) == [], log_path.read_text()
    finally:
        kill_all([agent.pid, *tree])
    text = log_path.read_text()
    stopped = latest(run)
    assert int(stopped.removeprefix("step_")) < steps, text
    assert "checkpoint saved at step" in text, text
    if sig != signal.SIGTERM:
        assert "the torchrun agent" in text and "is gone" in text, text
    assert not (run / "run.lock").exists(), text
