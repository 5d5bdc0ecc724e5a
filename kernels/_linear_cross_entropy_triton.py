"""Triton kernels for `kernels.linear_cross_entropy`; imported only on the Triton path.

Both kernels work on one [c, v] chunk of logits that cuBLAS has just produced, one program per
token row, walking the vocabulary in BLOCK_V slices. All arithmetic is fp32 whatever the logits
dtype (bf16 arithmetic is also wrong in Triton's CPU interpreter, which the tests use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_stats_kernel(
    logits_ptr, local_ptr, max_ptr, sumexp_ptr, target_ptr, V, stride_row, BLOCK_V: tl.constexpr
):
    # Online logsumexp kept per lane: each lane carries its own running max and sum, so the loop
    # has no cross-lane reduction; the lanes are merged once at the end.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        # A lane that has only seen padding (-inf) would compute exp(-inf - -inf) = nan.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(x - safe_max)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
    # The target logit, when this vocabulary shard holds the label (else 0, summed over ranks).
    label = tl.load(local_ptr + row)
    in_shard = (label >= 0) & (label < V)
    picked = tl.load(base + tl.where(in_shard, label, 0)).to(tl.float32)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, row_sum)
    tl.store(target_ptr + row, tl.where(in_shard, picked, 0.0))


@triton.jit
def _chunk_grad_kernel(logits_ptr, local_ptr, lse_ptr, g_ptr, V, stride_row, BLOCK_V: tl.constexpr):
    # dlogits = (exp(logit - lse) - onehot(label)) * g, written over the logits. The onehot is
    # folded into the same pass (a compare per element) so no element is written twice.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(local_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(base + cols, (p * g).to(logits_ptr.dtype.element_ty), mask=mask)


def _block_v(v: int) -> int:
    # 2048 fp32 lanes per program (16 per thread at 4 warps): enough bytes in flight per row,
    # and few loop trips at v = 32000.
    return min(triton.next_power_of_2(v), 2048)


def chunk_stats(logits, local, row_max, sumexp, target) -> None:
    """Fill row_max, sumexp, target [c] (fp32) from logits [c, v] and shard-local labels [c]."""
    c, v = logits.shape
    _chunk_stats_kernel[(c,)](
        logits, local, row_max, sumexp, target, v, logits.stride(0), BLOCK_V=_block_v(v)
    )


def chunk_grad_(logits, local, lse, g) -> torch.Tensor:
    """Overwrite logits [c, v] with dlogits = (softmax - onehot) * g; returns the same tensor."""
    c, v = logits.shape
    _chunk_grad_kernel[(c,)](logits, local, lse, g, v, logits.stride(0), BLOCK_V=_block_v(v))
    return logits
