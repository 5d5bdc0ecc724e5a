"""Shared pytest set-up: GPU tests are skipped without CUDA, with the reason shown; the
second megatron-core line (`pytest --megatron-line`) leaves out the tests proven not to
touch megatron-core."""

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.megatron_blocker import sitecustomize as megatron_blocker

# Test paths that never import megatron-core, in the pytest process or in any Python process
# they start. The main line runs them first with megatron made unimportable (a megatron
# import fails the test), so this list cannot go stale silently.
MEGATRON_FREE = (
    "tests/data/",
    "tests/kernels/",
    "tests/reference/",
    "tests/unit/test_dockerfile.py",
)
BLOCKER_DIR = str(Path(__file__).parent / "megatron_blocker")


def pytest_addoption(parser):
    parser.addoption("--megatron-line", action="store_true",
                     help="run only the tests that touch megatron-core (make test's second line)")


def is_megatron_free(item) -> bool:
    return item.nodeid.startswith(MEGATRON_FREE)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--megatron-line"):
        free = [item for item in items if is_megatron_free(item)]
        items[:] = [item for item in items if not is_megatron_free(item)]
        config.hook.pytest_deselected(items=free)
    else:
        items.sort(key=lambda item: not is_megatron_free(item))  # stable: free ones first
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA (run tools/gpu_check.sh on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


class _Blocking:
    blocker = None
    saved_env: dict = {}


def _block():
    if any(name == "megatron" or name.startswith("megatron.") for name in sys.modules):
        pytest.fail("megatron was imported before a megatron-free test ran; "
                    "MEGATRON_FREE tests must run first (tests/conftest.py)")
    _Blocking.saved_env = {k: os.environ.get(k) for k in ("OV2_BLOCK_MEGATRON", "PYTHONPATH")}
    os.environ["OV2_BLOCK_MEGATRON"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [BLOCKER_DIR, os.environ.get("PYTHONPATH")]))
    _Blocking.blocker = megatron_blocker.install()


def _unblock():
    sys.meta_path.remove(_Blocking.blocker)
    _Blocking.blocker = None
    for key, value in _Blocking.saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_runtest_setup(item):
    if item.config.getoption("--megatron-line"):
        return
    if is_megatron_free(item) and _Blocking.blocker is None:
        _block()
    elif not is_megatron_free(item) and _Blocking.blocker is not None:
        _unblock()
