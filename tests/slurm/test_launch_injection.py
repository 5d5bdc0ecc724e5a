"""The launchers never evaluate file contents or variables: a crafted checkpoints/latest or
OV2_*/SLURM_* value that bash arithmetic would run as a command (`a[$(cmd)]`) is refused as
"not a number" and runs nothing; valid values work as before. Needs no Slurm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm.jobs import REPO


def payload(marker: Path) -> str:
    """Text that runs `touch marker` wherever bash evaluates it arithmetically."""
    return f"a[$(touch {marker})]"


def shell(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`script` after sourcing launch/common.sh, with a stub scontrol (requeue succeeds)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "scontrol").write_text("#!/bin/sh\necho \"scontrol $*\"\n")
    (stubs / "scontrol").chmod(0o755)
    full_env = dict(PATH=f"{stubs}:/usr/bin:/bin", HOME=str(tmp_path), **env)
    return subprocess.run(["bash", "-c", f"source launch/common.sh && {script}"], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=30)


def run_dir(tmp_path: Path, latest: str, steps: int = 10) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "latest").write_text(latest + "\n")
    (run / "config.json").write_text(f'{{"train": {{"steps": {steps}}}}}\n')
    return run


@pytest.mark.parametrize("crafted", ["{}", "step_{}", "step_1+{}", "{}\nstep_00000010"])
def test_crafted_latest_runs_nothing_and_counts_as_unfinished(tmp_path, crafted):
    marker = tmp_path / "pwned"
    run = run_dir(tmp_path, crafted.format(payload(marker)))
    result = shell("if ov2_run_finished; then echo finished; else echo unfinished; fi",
                   tmp_path, OV2_OUTPUT_DIR=str(run))
    assert result.stdout.strip() == "unfinished", result
    assert not marker.exists()


def test_crafted_latest_after_sigusr1_stop_requeues_and_runs_nothing(tmp_path):
    """The measured attack: ov2_end_run after a SIGUSR1 stop reads `latest`."""
    marker = tmp_path / "pwned"
    run = run_dir(tmp_path, payload(marker))
    result = shell("OV2_STOP=USR1; ov2_end_run 0", tmp_path, OV2_OUTPUT_DIR=str(run),
                   SLURM_JOB_ID="42")
    assert result.returncode == 0, result
    assert "latest checkpoint: none (or not a step_N name)" in result.stdout
    assert "scontrol requeue 42" in result.stdout
    assert not marker.exists()


def test_valid_latest_compares_as_a_number(tmp_path):
    for latest, steps, expected in [("step_00000010", 10, "finished"),
                                    ("step_00000009", 10, "unfinished"),
                                    ("step_00000012", 10, "finished")]:
        run = run_dir(tmp_path, latest, steps)
        result = shell("if ov2_run_finished; then echo finished; else echo unfinished; fi",
                       tmp_path, OV2_OUTPUT_DIR=str(run))
        assert result.stdout.strip() == expected, (latest, result)


@pytest.mark.parametrize("name", ["OV2_MAX_RESTARTS", "SLURM_RESTART_COUNT"])
def test_crafted_restart_counts_are_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    run = run_dir(tmp_path, "step_00000001")
    result = shell("OV2_STOP=USR1; ov2_end_run 0", tmp_path, OV2_OUTPUT_DIR=str(run),
                   SLURM_JOB_ID="42", **{name: payload(marker)})
    assert result.returncode == 2, result
    assert f"{name}=" in result.stderr and "is not a number" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["OV2_STEPS", "OV2_TP", "OV2_PP", "OV2_VPP",
                                  "OV2_MICRO_BATCH", "OV2_MAX_RESTARTS", "OV2_MASTER_PORT",
                                  "OV2_STAGE", "OV2_SP", "OV2_RECIPE"])
def test_crafted_settings_are_refused_naming_the_variable(tmp_path, name):
    marker = tmp_path / "pwned"
    result = shell("ov2_check_env; echo accepted", tmp_path, **{name: payload(marker)})
    assert result.returncode == 2 and "accepted" not in result.stdout, result
    assert f"{name}=" in result.stderr
    assert not marker.exists()


def test_valid_settings_pass(tmp_path):
    result = shell("ov2_check_env; echo accepted", tmp_path, OV2_STEPS="100", OV2_TP="2",
                   OV2_STAGE="2", OV2_SP="true", OV2_RECIPE="vit_l14", OV2_MASTER_PORT="29500")
    assert result.returncode == 0 and result.stdout.strip() == "accepted", result


@pytest.mark.parametrize("name", ["SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK"])
def test_crafted_slurm_counts_in_the_runtime_env_run_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    result = shell('ov2_runtime_env 1; echo "device=$OV2_DEVICE threads=$OMP_NUM_THREADS"',
                   tmp_path, **{name: payload(marker)})
    assert result.returncode == 0, result
    assert "device=" in result.stdout
    assert not marker.exists()


def test_crafted_job_id_stops_the_batch_script_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    result = shell("ov2_slurm_job", tmp_path, SLURM_JOB_ID=f"1+{payload(marker)}",
                   SLURM_NTASKS="2", SLURM_JOB_NODELIST="n1", OV2_RECIPE="tiny_cpu")
    assert result.returncode == 2, result
    assert "SLURM_JOB_ID=" in result.stderr and "is not a number" in result.stderr
    assert not marker.exists()


def test_torchrun_script_refuses_a_crafted_setting(tmp_path):
    marker = tmp_path / "pwned"
    env = dict(PATH="/usr/bin:/bin", HOME=str(tmp_path), OV2_STEPS=payload(marker),
               OV2_PYTHON="/bin/false")
    result = subprocess.run([str(REPO / "launch" / "torchrun.sh"), "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert "OV2_STEPS=" in result.stderr
    assert not marker.exists()
    assert os.listdir(tmp_path) == []
