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


def test_a_port_taken_before_rank_zero_binds_it_is_retried_on_a_new_one(monkeypatch):
    """free_port closes the port it found; a parallel test run may take it before rank 0
    binds (seen in CI as EADDRINUSE). The launch is retried on a fresh port."""
    import socket

    from tests import harness

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    blocked = taken.getsockname()[1]
    ports = iter([blocked])
    real = harness.free_port
    picked = []

    def next_port():
        picked.append(next(ports, None) or real())
        return picked[-1]

    monkeypatch.setattr(harness, "free_port", next_port)
    try:
        assert run_distributed(all_reduce_rank, 2, timeout=120) == [(0, 3.0), (1, 3.0)]
    finally:
        taken.close()
    assert picked[0] == blocked and len(picked) == 2  # the first launch failed, one retry
