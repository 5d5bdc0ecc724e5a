"""Token dropping: keep k of the N patch tokens of every sample, in megatron's [s, b, h] layout.

OpenVision 2 feeds the caption decoder a random ~1/3 of the encoder's patch tokens. The encoder
output is sequence-first, `x: [s, b, h]`, whose first `prefix` rows are CLS/register tokens that
are not patches; `keep_idx: [b, k]` indexes the N = s - prefix patch positions of each sample.

    out[j, b, :] = x[prefix + keep_idx[b, j], b, :]        # out: [k, b, h], contiguous

Backward scatters the gradient into a zero `[s, b, h]`. Within one sample the kept indices are
unique, so every row of grad_x receives at most one source row: the scatter needs no atomics
and is deterministic. (Duplicate indices in a row would be a caller bug; the torch path would
sum them, the Triton path would keep one.)

Random keep indices are a counter-based hash of (seed, sample id, patch): each sample keeps the
k patches with the smallest hash, returned in ascending patch order. Any rank that knows a
sample's global id can regenerate its indices without communication (pipeline stages, TP
ranks, a resumed run), and the torch reference produces exactly the same indices as the kernel.

Why the kernels pay (ViT-L/14 @ 224 px: N = 256, prefix 1, k = 85, h = 1024, b = 256, bf16)
---------------------------------------------------------------------------------------------
The op has no FLOPs; it is bytes and launches.
  forward   kept rows: k*b*h*2 = 44.6 MB read + 44.6 MB written, i.e. ~21 us at 4.3 TB/s. The
            kernel moves exactly that. `torch.gather` with an expanded index moves the same
            DRAM bytes, so the forward win is small: no [k, b, h] int64 index walk and no
            permute/contiguous copy when the indices come from a [b, k] tensor.
  indices   torch: rand [b, N] + topk + sort = 3+ launches and a float tensor; kernel: one
            launch, one program per sample, integer hashing + a bitonic sort of N keys.
  backward  torch: memset of s*b*h (134 MB) + an atomic scatter_add of k*b*h (bf16 atomics,
            nondeterministic order). The kernel writes every row of grad_x exactly once,
            kept rows copied from grad_out and the rest zero: 134 MB written + 44.6 MB read,
            no memset pass, no atomics, bitwise deterministic.
So the kernel saves a pass and a few launches per step: microseconds, not milliseconds. It is
here because it is also the cleanest way to get deterministic, reproducible token dropping.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton

# Keys pack the patch index into the low bits so they are unique per sample: ties in the hash
# are broken by patch index, identically in torch and Triton.
PATCH_BITS = 12
MAX_PATCHES = 1 << PATCH_BITS
_MASK32 = 0xFFFFFFFF
# Multipliers are odd and < 2**31, so (x < 2**32) * C < 2**63 never overflows int64: the same
# int64 arithmetic is exact in torch, numpy (Triton's interpreter) and on the GPU.
_MIX_C1 = 0x7FEB352D
_MIX_C2 = 0x2C1B3C6D


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix on int64 values in [0, 2**32). Mirrors the Triton `_mix32`."""
    x = x ^ (x >> 16)
    x = (x * _MIX_C1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_C2) & _MASK32
    return x ^ (x >> 16)


def keep_scores(sample_ids: torch.Tensor, num_patches: int, seed: int) -> torch.Tensor:
    """Unique per-sample sort keys [b, N] (int64): hash(seed, sample, patch) << 12 | patch."""
    patch = torch.arange(num_patches, device=sample_ids.device, dtype=torch.int64)  # [N]
    h = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=sample_ids.device))
    h = _mix32((h + (sample_ids.to(torch.int64) & _MASK32)) & _MASK32)  # [b]
    h = _mix32((h[:, None] + patch) & _MASK32)  # [b, N]
    return (h << PATCH_BITS) | patch


def random_keep_indices_reference(
    sample_ids: torch.Tensor, num_patches: int, num_keep: int, seed: int
) -> torch.Tensor:
    """Torch reference: the `num_keep` patches with the smallest keys, ascending. [b, k] int64."""
    _check_keep(num_patches, num_keep)
    scores = keep_scores(sample_ids, num_patches, seed)  # [b, N]
    kept = scores.topk(num_keep, dim=1, largest=False).indices  # [b, k], key order
    return kept.sort(dim=1).values


def random_keep_indices(
    sample_ids: torch.Tensor, num_patches: int, num_keep: int, seed: int, backend: str = "auto"
) -> torch.Tensor:
    """Keep indices [b, k] (int64, ascending) for the samples with global ids `sample_ids` [b]."""
    if use_triton(backend, sample_ids):
        from kernels import _token_gather_triton as tk

        _check_keep(num_patches, num_keep)
        return tk.random_keep(sample_ids, num_patches, num_keep, seed)[0]
    return random_keep_indices_reference(sample_ids, num_patches, num_keep, seed)


def token_gather_reference(x: torch.Tensor, keep_idx: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Torch reference: x [s, b, h], keep_idx [b, k] -> [k, b, h]; autograd gives scatter-add."""
    _check_gather(x, keep_idx, prefix)
    rows = (keep_idx.to(torch.int64) + prefix).t()  # [k, b]
    return torch.gather(x, 0, rows[:, :, None].expand(-1, -1, x.shape[2]))  # [k, b, h]


def token_gather(
    x: torch.Tensor, keep_idx: torch.Tensor, prefix: int = 0, backend: str = "auto"
) -> torch.Tensor:
    """out[j, b] = x[prefix + keep_idx[b, j], b]: x [s, b, h], keep_idx [b, k] -> [k, b, h]."""
    if not use_triton(backend, x, keep_idx):
        return token_gather_reference(x, keep_idx, prefix)
    _check_gather(x, keep_idx, prefix)
    keep_idx = keep_idx.to(torch.int64).contiguous()
    b, k = keep_idx.shape
    num_patches = x.shape[0] - prefix
    # Inverse map [b, N]: the output row of each patch, -1 if dropped. Well-defined only
    # because indices within a row are unique; it lets backward write each grad row once.
    slot = torch.full((b, num_patches), -1, dtype=torch.int32, device=x.device)
    slot.scatter_(1, keep_idx, torch.arange(k, dtype=torch.int32, device=x.device).expand(b, k))
    return _TritonTokenGather.apply(x, keep_idx, slot, prefix)


def random_token_gather(
    x: torch.Tensor, sample_ids: torch.Tensor, num_keep: int, seed: int, prefix: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw keep indices from (seed, sample id) and gather: returns ([k, b, h], keep_idx [b, k])."""
    num_patches = x.shape[0] - prefix
    if not use_triton(backend, x, sample_ids):
        keep_idx = random_keep_indices_reference(sample_ids, num_patches, num_keep, seed)
        return token_gather_reference(x, keep_idx, prefix), keep_idx
    from kernels import _token_gather_triton as tk

    _check_keep(num_patches, num_keep)
    # The index kernel also emits the inverse map, so no scatter launch is needed here.
    keep_idx, slot = tk.random_keep(sample_ids, num_patches, num_keep, seed)
    _check_gather(x, keep_idx, prefix)
    return _TritonTokenGather.apply(x, keep_idx, slot, prefix), keep_idx


class _TritonTokenGather(torch.autograd.Function):
    """Gather kept rows forward; write every grad_x row exactly once backward (no atomics)."""

    @staticmethod
    def forward(ctx, x, keep_idx, slot, prefix):
        from kernels import _token_gather_triton as tk

        ctx.save_for_backward(slot)
        ctx.prefix = prefix
        ctx.x_shape = x.shape
        return tk.gather_forward(x, keep_idx, prefix)  # [k, b, h]

    @staticmethod
    def backward(ctx, grad_out):
        from kernels import _token_gather_triton as tk

        (slot,) = ctx.saved_tensors
        grad_x = tk.gather_backward(grad_out.contiguous(), slot, ctx.prefix, ctx.x_shape)
        return grad_x, None, None, None


def _check_keep(num_patches: int, num_keep: int) -> None:
    if not 1 <= num_keep <= num_patches:
        raise ValueError(f"num_keep {num_keep} must be in [1, num_patches={num_patches}]")
    if num_patches > MAX_PATCHES:
        raise ValueError(f"num_patches {num_patches} > {MAX_PATCHES}: raise PATCH_BITS")


def _check_gather(x: torch.Tensor, keep_idx: torch.Tensor, prefix: int) -> None:
    if x.dim() != 3 or keep_idx.dim() != 2:
        raise ValueError(f"want x [s, b, h] and keep_idx [b, k], got {tuple(x.shape)} and {tuple(keep_idx.shape)}")
    if keep_idx.shape[0] != x.shape[1]:
        raise ValueError(f"keep_idx batch {keep_idx.shape[0]} != x batch {x.shape[1]} (x is [s, b, h])")
    if not 0 <= prefix < x.shape[0]:
        raise ValueError(f"prefix {prefix} outside [0, s={x.shape[0]})")
    if keep_idx.shape[1] > x.shape[0] - prefix:
        raise ValueError(f"k {keep_idx.shape[1]} > number of patches {x.shape[0] - prefix}")
