"""What the launcher tests submit and read back: CPU job shape, a short tiny_cpu run, the
launcher environment, and the run directory's metrics and checkpoints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Turns launch/vit_1b.slurm's 8-node GPU request into 2 CPU tasks on the test node (sbatch
# options override the script's #SBATCH lines; Slurm 22.05 accepts --gpus-per-node=0).
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
           "--time=10"]
# A short tiny_cpu run: small batches, metrics every step, no extras at the end.
TINY_ARGS = ["--set", "train.global_batch=8", "--set", "train.micro_batch=2",
             "--set", "train.log_interval=1", "--set", "train.num_generate=0",
             "--set", "train.linear_probe=false", "--set", "train.eval_batches=1"]


def launcher_env(cache: Path) -> dict[str, str]:
    """This interpreter and checkout (installed or not), the session's tiny dataset, one
    thread per process, tiny_cpu."""
    venv_bin = str(Path(sys.executable).parent)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(PATH=f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                PYTHONPATH=pythonpath, OV2_PYTHON=sys.executable, OV2_CACHE=str(cache), OMP_NUM_THREADS="1",
                OV2_RECIPE="tiny_cpu")


def train_steps(run_dir: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl (evaluation records have no loss)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()
