"""Fixtures of the conversion tests: real checkpoints at TP=2 and PP=2, random pixels, the
tools run in a fresh process, and the third-party venv (.venv-convert, `make convert-env`).

timm and open_clip import torchvision, which cannot live beside the main venv's torch, so the
real timm / transformers / open_clip run in .venv-convert through third_party_features.py.
Without that venv the round trips skip, saying how to build it; everything else still runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess

import numpy as np
import pytest

from tests.conversion.checkpoints import make_checkpoints
from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT_VENV = os.path.join(ROOT, ".venv-convert")
CONVERT_PYTHON = os.path.join(CONVERT_VENV, "bin", "python")
THIRD_PARTY_SCRIPT = os.path.join(ROOT, "tests", "conversion", "third_party_features.py")
TOLERANCE = 1e-5  # fp32 features, this framework vs the third-party package
# Measured on a 2-core box (tests/conversion alone, ~4 min): the longest run_tools call took
# 59 s (import-openclip writing TP=2 + export + extract), the longest third_party call 22 s
# (open_clip import + build). 5x and more covers a loaded CI machine of that size.
TOOLS_TIMEOUT_S = 300
THIRD_PARTY_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def convert_python() -> str:
    if not os.path.isfile(os.path.join(CONVERT_VENV, ".installed-stamp")):
        pytest.skip(f"{CONVERT_VENV} is missing or incomplete: `make convert-env` builds it "
                    "(torch 2.14.1 + torchvision + timm + transformers + open_clip) to run the "
                    "round trips through the real third-party packages")
    return CONVERT_PYTHON


def third_party(python: str, *jobs: tuple) -> list[dict]:
    """Run third_party_features.py in .venv-convert, one process for all `jobs`
    ((library, model_dir, pixels, out_dir, *flags) each); returns each job's arrays by name
    (patch_tokens, pooled, penultimate, ...) and its `info`."""
    argv = []
    for job in jobs:
        argv += ["--job", *job[:4]] + list(job[4:])
    done = subprocess.run([python, THIRD_PARTY_SCRIPT, *argv], capture_output=True, text=True,
                          timeout=THIRD_PARTY_TIMEOUT_S, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, f"third_party_features.py failed:\n{done.stderr[-4000:]}"
    results = []
    for job in jobs:
        out_dir = job[3]
        with open(os.path.join(out_dir, "info.json")) as f:
            result = dict(info=json.load(f))
        result.update({name[:-len(".npy")]: np.load(os.path.join(out_dir, name))
                       for name in os.listdir(out_dir) if name.endswith(".npy")})
        results.append(result)
    return results


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tools_rank(commands: list[tuple[str, list[str]]]) -> list[tuple[int, str, str]]:
    results = []
    for tool, argv in commands:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _load_tool(tool).main(argv)
        results.append((code, out.getvalue(), err.getvalue()))
    return results


def run_tools(*commands: tuple[str, list[str]], check: bool = True) -> list[tuple[int, str, str]]:
    """Run tools' main(argv) one after another in one fresh process (megatron is built there,
    and one process saves the imports a subprocess per command would repeat)."""
    results = run_distributed(_tools_rank, 1, args=(list(commands),),
                              timeout=TOOLS_TIMEOUT_S)[0]
    if check:
        for (tool, argv), (code, _, err) in zip(commands, results):
            assert code == 0, f"{tool} {' '.join(argv)} exited {code}:\n{err[-3000:]}"
    return results


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, str]:
    """Run dirs of the tiny_cpu shape saved by the training code:
    tp2: sin-cos positions, no registers, TP=2;
    pp2: learned positions, 2 registers, learned decoder positions, PP=2."""
    root = tmp_path_factory.mktemp("runs")
    layouts = {"tp2": (str(root / "tp2"), 2, 1, ()),
               "pp2": (str(root / "pp2"), 1, 2, ("model.vision.num_registers=2",
                                                 "model.vision.pos_embed=learned",
                                                 "model.decoder.pos_embed=learned"))}
    make_checkpoints(*layouts.values())
    return {name: layout[0] for name, layout in layouts.items()}


@pytest.fixture(scope="session")
def tp2_run(runs) -> str:
    return runs["tp2"]


@pytest.fixture(scope="session")
def pp2_run(runs) -> str:
    return runs["pp2"]


@pytest.fixture(scope="session")
def pixels(tmp_path_factory) -> str:
    """Random normalised images at the tiny recipe's resolution: [4, 3, S, S] float32."""
    from ov2_megatron.recipes import get_recipe

    size = get_recipe("tiny_cpu").model.vision.image_size
    path = str(tmp_path_factory.mktemp("pixels") / "pixels.npy")
    np.save(path, np.random.default_rng(0).standard_normal((4, 3, size, size), np.float32))
    return path


def assert_features_close(ours: dict, theirs: dict, what: str,
                          names=("patch_tokens", "pooled")) -> float:
    """The named features equal within TOLERANCE; returns the max difference."""
    worst = 0.0
    for name in names:
        assert ours[name].shape == theirs[name].shape, (what, name, ours[name].shape,
                                                        theirs[name].shape)
        diff = float(np.abs(ours[name] - theirs[name]).max())
        assert diff <= TOLERANCE, f"{what}: {name} differ by {diff:.2e} > {TOLERANCE:.0e}"
        worst = max(worst, diff)
    return worst
