"""Initialisation that does not depend on the parallel layout.

megatron draws initial weights in construction order, so a PP=2 stage (which builds only its
own layers) or a different TP size starts from different weights than PP=1. Here every
parameter is drawn whole from a generator seeded by (seed, its standard name), in the
standard layout, then converted to megatron's layout and cut to this rank's TP shard. Every
layout therefore starts from the same model, which makes runs comparable and lets the
equivalence tests compare whole training trajectories.

Two schemes (model.init): 'official', each parameter kind as the official OpenVision 2 code
draws it (models/parameter_kinds.py), and 'megatron', one std (model.init_std) for every
weight but the three whose input is not a unit-scale residual stream.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core import parallel_state

from ov2_megatron.config import ModelConfig
from ov2_megatron.models import state_dict_adapter as adapter
from ov2_megatron.models.parameter_kinds import Init, constant_init, official_init


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# Layers whose input is not a unit-scale residual stream get fan-in scaled (LeCun) inits, as
# in big_vision and the OpenVision 2 code: with std 0.02 the patch embedding's output would
# be ~4x smaller than the sin-cos position table and the image would start out drowned.
_FAN_IN_SCALED = ("vision.patch_embed.weight", "decoder.img_proj.weight", "decoder.head.weight")


def megatron_init(name: str, shape: tuple[int, ...], std: float) -> Init:
    """The 'megatron' scheme: N(0, std) for every weight, fan-in scaled where noted above."""
    constant = constant_init(name)
    if constant:
        return constant
    if name in _FAN_IN_SCALED:
        return Init("normal", math.prod(shape[1:]) ** -0.5)
    return Init("normal", std)


def draw(init: Init, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A tensor of `shape` from `init`."""
    if init.kind == "zeros":
        return torch.zeros(shape)
    if init.kind == "ones":
        return torch.ones(shape)
    if init.kind == "uniform":
        return (torch.rand(shape, generator=generator) * 2 - 1) * init.bound
    if init.kind == "truncated_normal":
        sigma = init.bound / 2  # the uncut normal's std
        return torch.nn.init.trunc_normal_(torch.empty(shape), 0.0, sigma, -2 * sigma,
                                           2 * sigma, generator=generator)
    return torch.randn(shape, generator=generator) * init.std


def parameter_init(name: str, shape: tuple[int, ...], model: ModelConfig) -> Init:
    """The initialiser of standard parameter `name` (full `shape`) under model.init."""
    if model.init == "megatron":
        return megatron_init(name, shape, model.init_std)
    return official_init(name, shape, model.vision.shape()[0].width, model.decoder.shape().width)


def initialize_weights(chunk, seed: int, model: ModelConfig) -> None:
    """Overwrite every parameter of `chunk` (an OpenVision2 module) in place."""
    vit_heads, decoder_heads = model.vision.shape()[0].num_heads, model.decoder.shape().num_heads
    vocab_size = model.decoder.vocab_size
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in chunk.named_parameters():
        std_name = adapter.standard_name(name, chunk.plan)
        full_shape = list(param.shape)
        sharded = getattr(param, "tensor_model_parallel", False)
        if sharded:
            full_shape[param.partition_dim] *= tp
        shape = (vocab_size, *full_shape[1:]) if std_name in adapter.VOCAB_ROWS \
            else tuple(full_shape)
        value = draw(parameter_init(std_name, shape, model), shape, _generator(seed, std_name))
        adapter.copy_from_standard(param, name, chunk.plan, value, vit_heads, decoder_heads,
                                   full_shape[0], tp, tp_rank)
