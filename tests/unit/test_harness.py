"""The distributed test harness itself: results in rank order, tracebacks, and no hangs."""

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
