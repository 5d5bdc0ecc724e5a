"""One run per output directory (training/run_lock.py): a live owner refuses a second run with
a message naming it and the fix; a lock left by a dead run is taken over, saying so; on two
ranks both fail together when rank 0 is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ov2_megatron.training import run_lock
from tests.harness import DistributedFailure, run_distributed


@pytest.fixture(autouse=True)
def _release():
    yield
    run_lock.release_all()


def plant(run_dir, **owner):
    """A lock file as another process would have written it."""
    os.makedirs(run_dir, exist_ok=True)
    record = run_lock._owner_record("someone-else")
    record.update(owner)
    path = os.path.join(run_dir, run_lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lock_names_its_owner_and_is_released(tmp_path):
    run = str(tmp_path / "run")
    assert run_lock.acquire(run) is None
    path = os.path.join(run, run_lock.LOCK_NAME)
    owner = json.load(open(path))
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert owner["started"].endswith("Z") and owner["pid_start_ticks"] is not None
    assert run_lock.acquire(run) is None  # this process holds it already
    run_lock.release_all()
    assert not os.path.exists(path)


def test_second_run_is_refused_naming_the_owner_and_the_fix(tmp_path, live_process):
    run = str(tmp_path / "run")
    path = plant(run, pid=live_process.pid,
                 pid_start_ticks=run_lock._start_ticks(live_process.pid))
    with pytest.raises(run_lock.RunDirectoryInUse) as error:
        run_lock.acquire(run)
    message = str(error.value)
    assert f"PID {live_process.pid}" in message and socket.gethostname() in message
    assert "another train.output_dir" in message and f"delete {path}" in message
    assert json.load(open(path))["token"] == "someone-else"  # left alone


def test_a_second_process_is_refused_while_the_first_runs(tmp_path):
    run = str(tmp_path / "run")
    run_lock.acquire(run)
    code = ("import sys; from ov2_megatron.training import run_lock\n"
            "try:\n    run_lock.acquire(sys.argv[1])\n"
            "except run_lock.RunDirectoryInUse as e:\n    print(e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code, run], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3, result
    assert f"PID {os.getpid()}" in result.stdout


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "rebooted"])
def test_stale_lock_on_this_host_is_taken_over(tmp_path, case, live_process):
    run = str(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"dead pid": dict(pid=dead.pid),
             "reused pid": dict(pid=live_process.pid, pid_start_ticks=1),
             "rebooted": dict(pid=live_process.pid, boot_id="another-boot")}[case]
    plant(run, **owner)
    note = run_lock.acquire(run)
    assert note and "took over a stale lock" in note and f"PID {owner['pid']}" in note
    assert json.load(open(os.path.join(run, run_lock.LOCK_NAME)))["pid"] == os.getpid()


def test_other_host_lock_is_honoured_until_its_heartbeat_is_old(tmp_path):
    run = str(tmp_path / "run")
    path = plant(run, host="elsewhere", pid=1)
    with pytest.raises(run_lock.RunDirectoryInUse, match="host elsewhere"):
        run_lock.acquire(run)
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    assert "no heartbeat" in run_lock.acquire(run)


def test_earlier_run_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    plant(run, host="elsewhere", slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "earlier run of Slurm job 77" in run_lock.acquire(run)


def locked_on_two_ranks(run_dir):
    from ov2_megatron.training import run_lock

    run_lock.take_for_run(run_dir)


def test_every_rank_fails_when_rank_0_is_refused(tmp_path, live_process):
    run = str(tmp_path / "run")
    plant(run, pid=live_process.pid, pid_start_ticks=run_lock._start_ticks(live_process.pid))
    with pytest.raises(DistributedFailure) as error:
        run_distributed(locked_on_two_ranks, 2, args=(run,), timeout=120)
    assert "2 of 2 ranks failed" in str(error.value)
    assert str(error.value).count("RunDirectoryInUse") >= 2
