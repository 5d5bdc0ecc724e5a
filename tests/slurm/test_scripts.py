"""The launch scripts parse, pass shellcheck, keep the Slurm contract the other tests rely on,
and map every OV2_* override to a key ov2-train knows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.slurm.jobs import REPO

SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".slurm"))
SLURM_SCRIPTS = [p for p in SCRIPTS if p.suffix == ".slurm" and p.stem.startswith("vit_")]


def test_every_script_parses():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "torchrun.sh", "vit_1b.slurm",
                                         "vit_l14.slurm"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_contract(script):
    """One task per GPU, the batch-shell USR1 before the limit, requeue, one appended log."""
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), re.M))
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "8"
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])
    assert "requeue" in options and options["open-mode"] == "append"
    assert "%j" in options["output"]


def test_every_override_is_a_train_key():
    keys = subprocess.run([sys.executable, "-m", "ov2_megatron.train", "--help-keys"],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout
    known = {line.split(" = ")[0] for line in keys.splitlines()}
    mapping = subprocess.run(
        ["bash", "-c", 'source launch/common.sh && printf "%s\\n" "${OV2_SET_KEYS[@]}"'],
        capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    assert len(mapping) >= 10
    assert {pair.split("=")[1] for pair in mapping} <= known


def test_overrides_become_train_arguments():
    env = dict(OV2_RECIPE="vit_1b", OV2_STAGE="2", OV2_TP="4", OV2_TRAIN_DATA="/d/*.tar",
               PATH="/usr/bin:/bin")
    out = subprocess.run(
        ["bash", "-c", 'source launch/common.sh && ov2_train_args --set train.lr=1 && '
                       'printf "%s\\n" "${OV2_ARGS[@]}"'],
        capture_output=True, text=True, check=True, cwd=REPO, env=env).stdout.splitlines()
    assert out == ["--recipe", "vit_1b", "--stage", "2", "--set", "parallel.tensor=4",
                   "--set", "data.train_shards=/d/*.tar", "--set", "train.lr=1"]
