"""Token dropping: each example's decoder sees a random subset of its patch tokens.

The choice is a pure function of (seed, the example's index in the sample stream): every TP
and PP rank of a replica derives the same indices without communication, replicas see
different examples and so different choices, a resumed run repeats them exactly, and the
choice does not depend on how the global batch is split across data-parallel ranks.
Indices come in the order drawn (a random permutation's first k), as the reference draws
them with `jax.random.choice(..., replace=False)`.
"""

from __future__ import annotations

import torch

from kernels.token_gather import token_gather

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads nearby (seed, index) pairs apart


def keep_indices(sample_index: torch.Tensor, num_patches: int, num_kept: int,
                 seed: int) -> torch.Tensor:
    """[b] int64 stream positions -> [b, k] int64 patch indices, uniform without replacement."""
    if not 0 < num_kept <= num_patches:
        raise ValueError(f"num_kept {num_kept} must be in [1, num_patches={num_patches}]")
    rows = []
    for index in sample_index.tolist():
        gen = torch.Generator().manual_seed((seed * _MIX + index) % (2**63 - 1))
        rows.append(torch.randperm(num_patches, generator=gen)[:num_kept])
    return torch.stack(rows).to(sample_index.device)  # [b, k]


def gather_kept(tokens: torch.Tensor, prefix: int, keep_idx: torch.Tensor) -> torch.Tensor:
    """tokens [s, b, h] (prefix CLS/registers first) -> kept patch tokens [k, b, h].
    kernels.token_gather: the fused Triton gather on CUDA (backward writes each gradient row
    once, no memset or atomics), torch.gather elsewhere."""
    return token_gather(tokens, keep_idx, prefix)
