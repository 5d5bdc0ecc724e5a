"""Triton kernels for `kernels.token_gather`; imported only on the Triton path.

Kept in a module of their own because `triton.jit` resolves helpers through module globals and
reads TRITON_INTERPRET at definition time: this module is imported lazily, after both are set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.token_gather import _MASK32, _MIX_C1, _MIX_C2, PATCH_BITS

MASK32: tl.constexpr = tl.constexpr(_MASK32)
MIX_C1: tl.constexpr = tl.constexpr(_MIX_C1)
MIX_C2: tl.constexpr = tl.constexpr(_MIX_C2)
BITS: tl.constexpr = tl.constexpr(PATCH_BITS)
INT64_MAX: tl.constexpr = tl.constexpr(2**63 - 1)


@triton.jit
def _mix32(x):
    # Same steps as kernels.token_gather._mix32, on int64 values in [0, 2**32).
    x = x ^ (x >> 16)
    x = (x * MIX_C1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_C2) & MASK32
    return x ^ (x >> 16)


# `seed` is not specialised: a seed of 1 would otherwise arrive as a constexpr without `.to`.
@triton.jit(do_not_specialize=["seed"])
def _random_keep_kernel(sample_ptr, keep_ptr, slot_ptr, N, K, seed, BLOCK_N: tl.constexpr):
    # One program per sample: hash all N patches, sort the keys, keep those <= the k-th smallest.
    b = tl.program_id(0).to(tl.int64)
    patch = tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    valid = patch < N
    h = _mix32(seed.to(tl.int64) & MASK32)
    h = _mix32((h + (tl.load(sample_ptr + b) & MASK32)) & MASK32)
    h = _mix32((h + patch) & MASK32)  # [BLOCK_N]
    key = tl.where(valid, (h << BITS) | patch, INT64_MAX)  # padding sorts last
    # The max of the first K sorted keys is the k-th smallest; keys are unique, so exactly K
    # patches satisfy key <= threshold.
    ranked = tl.sort(key)
    threshold = tl.max(tl.where(tl.arange(0, BLOCK_N) < K, ranked, -1), axis=0)
    kept = valid & (key <= threshold)
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # output row of each kept patch, ascending
    tl.store(keep_ptr + b * K + slot, patch, mask=kept)
    tl.store(slot_ptr + b * N + patch, tl.where(kept, slot, -1), mask=valid)


@triton.jit
def _gather_fwd_kernel(
    x_ptr, idx_ptr, out_ptr, B, H, K, prefix, stride_xs, stride_xb, BLOCK_H: tl.constexpr
):
    # One program per (output row j*B + b, block of h): a contiguous row copy.
    row = tl.program_id(0).to(tl.int64)
    j = row // B
    b = row % B
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    src = prefix + tl.load(idx_ptr + b * K + j)
    vals = tl.load(x_ptr + src * stride_xs + b * stride_xb + cols, mask=mask)
    # Round trip through fp32: exact for fp32/fp16/bf16, and keeps the CPU interpreter (whose
    # bf16 arithmetic is wrong) out of bf16 entirely.
    tl.store(out_ptr + row * H + cols, vals.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_bwd_kernel(gout_ptr, slot_ptr, gx_ptr, B, H, N, prefix, BLOCK_H: tl.constexpr):
    # One program per (grad_x row s*B + b, block of h): each row is written once, either the
    # kept token's gradient or zero, so no memset pass and no atomics.
    row = tl.program_id(0).to(tl.int64)
    si = row // B
    b = row % B
    patch = si - prefix
    j = tl.load(slot_ptr + b * N + tl.maximum(patch, 0))
    j = tl.where(patch >= 0, j, -1)  # prefix rows (CLS/registers) get no gradient
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    # Dropped rows read nothing: their load mask is empty (cols < 0) and `other` fills zeros.
    # (One comparison against a per-row limit, because the interpreter rejects a tensor mask
    # and-ed with a scalar one.)
    src_mask = cols < tl.where(j >= 0, H, 0)
    vals = tl.load(gout_ptr + (j * B + b) * H + cols, mask=src_mask, other=0.0)
    tl.store(gx_ptr + row * H + cols, vals.to(tl.float32).to(gx_ptr.dtype.element_ty), mask=mask)


def _block_h(h: int) -> int:
    # Up to 1024 columns (2 KB of bf16) per program: wide enough to saturate a row's bandwidth,
    # small enough to leave many programs per SM when k*b is small.
    return min(triton.next_power_of_2(h), 1024)


def random_keep(sample_ids: torch.Tensor, num_patches: int, num_keep: int, seed: int):
    """-> keep_idx [b, k] int64 ascending, slot [b, N] int32 (output row of each patch or -1)."""
    sample_ids = sample_ids.to(torch.int64).contiguous()
    b = sample_ids.shape[0]
    keep_idx = torch.empty((b, num_keep), dtype=torch.int64, device=sample_ids.device)
    slot = torch.empty((b, num_patches), dtype=torch.int32, device=sample_ids.device)
    _random_keep_kernel[(b,)](
        sample_ids, keep_idx, slot, num_patches, num_keep, seed & _MASK32,
        BLOCK_N=triton.next_power_of_2(num_patches),
    )
    return keep_idx, slot


def gather_forward(x: torch.Tensor, keep_idx: torch.Tensor, prefix: int) -> torch.Tensor:
    if x.stride(2) != 1:
        x = x.contiguous()
    _, b, h = x.shape
    k = keep_idx.shape[1]
    out = torch.empty((k, b, h), dtype=x.dtype, device=x.device)  # [k, b, h]
    block = _block_h(h)
    _gather_fwd_kernel[(k * b, triton.cdiv(h, block))](
        x, keep_idx, out, b, h, k, prefix, x.stride(0), x.stride(1), BLOCK_H=block
    )
    return out


def gather_backward(grad_out: torch.Tensor, slot: torch.Tensor, prefix: int, x_shape) -> torch.Tensor:
    s, b, h = x_shape
    grad_x = torch.empty((s, b, h), dtype=grad_out.dtype, device=grad_out.device)  # [s, b, h]
    block = _block_h(h)
    _gather_bwd_kernel[(s * b, triton.cdiv(h, block))](
        grad_out, slot, grad_x, b, h, slot.shape[1], prefix, BLOCK_H=block
    )
    return grad_x
