"""Shared pytest set-up: GPU tests are skipped without CUDA, with the reason shown, and the
suite splits into the tests that touch megatron-core and the few proven not to.

`make test` runs `pytest --megatron-free` (only the MEGATRON_FREE paths, with megatron-core
unimportable in pytest and in every Python process the tests start: a megatron import fails
the test, so the list cannot go stale silently), then `pytest --megatron-line` (everything
else) on each megatron-core line. A plain `pytest` runs everything, unblocked."""

import os
from pathlib import Path

import pytest
import torch

from tests.megatron_blocker import sitecustomize as megatron_blocker

ROOT = Path(__file__).resolve().parent.parent
MEGATRON_FREE = (
    "tests/data/",
    "tests/kernels/",
    "tests/reference/",
    "tests/unit/test_cpu_allocator.py",
    "tests/unit/test_dockerfile.py",
)
BLOCKER_DIR = str(Path(__file__).parent / "megatron_blocker")


def pytest_addoption(parser):
    group = parser.getgroup("megatron-core lines")
    group.addoption("--megatron-free", action="store_true",
                    help="run only the MEGATRON_FREE tests, with megatron-core unimportable")
    group.addoption("--megatron-line", action="store_true",
                    help="run only the tests that touch megatron-core")


def pytest_configure(config):
    if config.getoption("--megatron-free") and config.getoption("--megatron-line"):
        raise pytest.UsageError("--megatron-free and --megatron-line select disjoint tests")
    if config.getoption("--megatron-free"):
        os.environ["OV2_BLOCK_MEGATRON"] = "1"  # read by sitecustomize in subprocesses
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [BLOCKER_DIR, os.environ.get("PYTHONPATH")]))
        megatron_blocker.install()


def relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix() + ("/" if path.is_dir() else "")
    except ValueError:
        return ""


def is_free(rel: str) -> bool:
    return rel.startswith(MEGATRON_FREE)


def pytest_ignore_collect(collection_path, config):
    """Under --megatron-free, never import a module outside the list (it may import megatron)."""
    if not config.getoption("--megatron-free"):
        return None
    rel = relative(collection_path)
    if not rel.startswith("tests/"):
        return None
    if collection_path.is_dir():
        return not (is_free(rel) or any(free.startswith(rel) for free in MEGATRON_FREE))
    return not is_free(rel)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--megatron-line"):
        free = [item for item in items if is_free(item.nodeid)]
        items[:] = [item for item in items if not is_free(item.nodeid)]
        config.hook.pytest_deselected(items=free)
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA (run tools/gpu_check.sh on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
