"""Initialisation that does not depend on the parallel layout.

megatron draws initial weights in construction order, so a PP=2 stage (which builds only its
own layers) or a different TP size starts from different weights than PP=1. Here every
parameter is drawn whole from a generator seeded by (seed, its standard name), in the
standard layout, then converted to megatron's layout and cut to this rank's TP shard. Every
layout therefore starts from the same model, which makes runs comparable and lets the
equivalence tests compare whole training trajectories.
"""

from __future__ import annotations

import zlib

import torch
from megatron.core import parallel_state

from ov2_megatron.models import state_dict_adapter as adapter


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# Layers whose input is not a unit-scale residual stream get fan-in scaled (LeCun) inits, as
# in big_vision and the OpenVision 2 code: with std 0.02 the patch embedding's output would
# be ~4x smaller than the sin-cos position table and the image would start out drowned.
_FAN_IN_SCALED = ("vision.patch_embed.weight", "decoder.img_proj.weight", "decoder.head.weight")


def _standard_value(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """The full tensor in the standard layout (vocabulary unpadded)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if (".ln" in name or ".norm." in name) and leaf == "weight":
        return torch.ones(shape)
    if name in _FAN_IN_SCALED:
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        std = fan_in ** -0.5
    return torch.randn(shape, generator=_generator(seed, name)) * std


def initialize_weights(chunk, seed: int, std: float, vit_heads: int, decoder_heads: int,
                       vocab_size: int) -> None:
    """Overwrite every parameter of `chunk` (an OpenVision2 module) in place."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in chunk.named_parameters():
        std_name = adapter.standard_name(name, chunk.plan)
        full_shape = list(param.shape)
        sharded = getattr(param, "tensor_model_parallel", False)
        if sharded:
            full_shape[param.partition_dim] *= tp
        if std_name in adapter.VOCAB_ROWS:
            value = _standard_value(std_name, (vocab_size, *full_shape[1:]), std, seed)
        else:
            value = _standard_value(std_name, tuple(full_shape), std, seed)
        adapter.copy_from_standard(param, name, chunk.plan, value, vit_heads, decoder_heads,
                                   full_shape[0], tp, tp_rank)
