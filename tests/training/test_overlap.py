"""overlap_grad_reduce and overlap_param_gather (on by default on GPUs) against the
synchronous path, through the real training loop on CPU (gloo), at DP=2 and at PP=2 x DP=2
with interleaving (megatron's aligned gather). The reference is the same run with both off:
- every step's loss and grad norm and the final validation loss are equal;
- the checkpoints hold the same weights, bitwise: with overlap_param_gather the all-gather
  after optimizer.step waits for the next forward, so without the forced gather DP rank 0
  would write its stale copy of the other ranks' shards;
- a run with both on, stopped at step 2 and resumed, continues with the same losses.
"""

import json
import os

import pytest
import torch

from tests.harness import run_distributed
from tests.training.test_resume import STEPS, losses, train_rank

OFF = ["train.overlap_grad_reduce=false", "train.overlap_param_gather=false"]
ON = ["train.overlap_grad_reduce=true", "train.overlap_param_gather=true"]


@pytest.fixture(scope="module", autouse=True)
def dataset_cache(tmp_path_factory):
    os.environ["OV2_CACHE"] = str(tmp_path_factory.mktemp("ov2cache"))
    yield


def saved_weights(output_dir: str, step: int) -> dict:
    from ov2_megatron.conversion.megatron_checkpoint import load_run_config, read_standard

    step_dir = os.path.join(output_dir, "checkpoints", f"step_{step:08d}")
    return read_standard(step_dir, load_run_config(os.path.join(output_dir, "config.json")))[0]


def grad_norms(output_dir: str) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["grad_norm"] for r in map(json.loads, f) if "grad_norm" in r}


@pytest.mark.parametrize("world,layout", [
    (2, []),
    (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
])
def test_overlapped_communication_equals_the_synchronous_path(tmp_path, world, layout):
    sync, overlap, resumed = (str(tmp_path / name) for name in ("sync", "overlap", "resumed"))
    want = run_distributed(train_rank, world, args=(sync, None, OFF + layout), timeout=300)[0]
    got = run_distributed(train_rank, world, args=(overlap, None, ON + layout), timeout=300)[0]
    assert sorted(losses(sync)) == list(range(1, STEPS + 1))
    assert losses(overlap) == losses(sync)
    assert grad_norms(overlap) == grad_norms(sync)
    assert got["val_loss"] == want["val_loss"]
    for step in (2, STEPS):
        sync_weights = run_distributed(saved_weights, 1, args=(sync, step), timeout=300)[0]
        overlap_weights = run_distributed(saved_weights, 1, args=(overlap, step), timeout=300)[0]
        assert sync_weights.keys() == overlap_weights.keys()
        for name, value in sync_weights.items():
            assert torch.equal(overlap_weights[name], value), (step, name)

    first = run_distributed(train_rank, world, args=(resumed, 2, ON + layout), timeout=300)[0]
    assert first["preempted"] and first["step"] == 2
    run_distributed(train_rank, world, args=(resumed, None, ON + layout), timeout=300)
    assert losses(resumed) == losses(sync)
