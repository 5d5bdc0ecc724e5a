"""The distributed test harness itself: results in rank order, tracebacks, and no hangs."""

import os
import time

import pytest
import torch

from tests.harness import DistributedFailure, run_distributed


def all_reduce_rank():
    import torch.distributed as dist

    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")
    return "fine"


def hang_on_rank_zero():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        time.sleep(600)
    return "done"


def test_results_come_back_in_rank_order_over_real_collectives():
    assert run_distributed(all_reduce_rank, 4) == [(r, 10.0) for r in range(4)]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(DistributedFailure) as info:
        run_distributed(fail_on_rank_one, 2)
    assert "--- rank 1 ---" in str(info.value)
    assert "ValueError: rank one is broken" in str(info.value)


def test_a_hanging_rank_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(DistributedFailure, match="timed out"):
        run_distributed(hang_on_rank_zero, 2, timeout=8)
    assert time.monotonic() - start < 30


def test_megatron_free_tests_cannot_import_megatron():
    """The blocker that proves tests/conftest.py's MEGATRON_FREE list refuses megatron in a
    subprocess of a blocked test (and lets it through elsewhere)."""
    import subprocess
    import sys

    from tests.conftest import BLOCKER_DIR

    probe = [sys.executable, "-c", "import megatron"]
    env = dict(os.environ, PYTHONPATH=BLOCKER_DIR, OV2_BLOCK_MEGATRON="1")
    blocked = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0 and "megatron-free" in blocked.stderr, blocked.stderr
    env["OV2_BLOCK_MEGATRON"] = "0"
    assert subprocess.run(probe, env=env, timeout=120).returncode == 0
