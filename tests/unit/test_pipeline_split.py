"""FLOP-balanced stage split: optimal against brute force, and the boundary placement."""

import itertools
import random

import pytest

from ov2_megatron.parallel.pipeline_split import balanced_split, layer_flops, plan_stages
from ov2_megatron.variants import DECODER_SHAPES, vit_shape


def brute_force(costs, chunks):
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), chunks - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_optimal(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 10) for _ in range(rng.randint(2, 9))]
    chunks = rng.randint(1, len(costs))
    ranges = balanced_split(costs, chunks)
    assert len(ranges) == chunks and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    assert max(sum(costs[a:b]) for a, b in ranges) == pytest.approx(brute_force(costs, chunks))


def test_g14_plan_balances_encoder_and_decoder():
    vit, _ = vit_shape("g/14")
    dec = DECODER_SHAPES["L"]
    plans = plan_stages(vit, 257, dec, 216, head_flops=2 * 127 * 768 * 32000, chunks=4)
    assert plans[0].has_embedding and plans[-1].has_head
    assert sum(p.has_boundary for p in plans) == 1
    assert sum(p.num_vit_layers for p in plans) == 40 and sum(p.num_decoder_layers for p in plans) == 12
    # a g/14 layer at 257 tokens costs ~4x a decoder-L layer at 216: the decoder (12 layers)
    # shares the last stage with part of the ViT instead of taking a stage of its own
    assert layer_flops(vit, 257) > 4 * layer_flops(dec, 216)
    assert plans[-1].num_vit_layers > 0 and plans[-1].num_decoder_layers == 12


def test_too_many_chunks_is_a_clear_error():
    with pytest.raises(ValueError, match="lower parallel.pipeline"):
        balanced_split([1.0, 2.0], 3)
