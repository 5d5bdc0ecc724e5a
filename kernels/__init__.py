"""Triton kernels that pay for themselves, each beside the torch reference it must match.

    token_gather                 keep k of N patch tokens per sample in [s, b, h] (token drop)
    random_token_gather          the same, with keep indices hashed from (seed, sample id)
    linear_cross_entropy         caption-head linear + CE without [tokens, vocab] logits

Importing this package never imports Triton: each op takes backend="auto" | "torch" |
"triton" and reaches for Triton only on CUDA tensors, or when forced under TRITON_INTERPRET=1
(see kernels.dispatch). Every CPU run takes the torch path.
"""

from kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    vocab_parallel_linear_cross_entropy,
)
from kernels.token_gather import (
    random_keep_indices,
    random_keep_indices_reference,
    random_token_gather,
    token_gather,
    token_gather_reference,
)

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "random_keep_indices",
    "random_keep_indices_reference",
    "random_token_gather",
    "token_gather",
    "token_gather_reference",
    "vocab_parallel_linear_cross_entropy",
]
