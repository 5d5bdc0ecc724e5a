"""The one table of model sizes: ViT encoders and caption decoders.

`"L/14"` names a ViT-L with 14-pixel patches (big_vision convention); decoders are named by
size alone. Parameter counts at 224 px (CLS token, sin-cos positions), checked by
tests/model/test_variants.py: L/14 302.9M (paper 304M), So400m/14 412.1M (paper "400M", the
SigLIP shape), H/14 630.4M (632M), g/14 1.011B (1.01B), G/14 1.84B (beyond the paper).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerShape:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


VIT_SHAPES: dict[str, TransformerShape] = {
    "Ti": TransformerShape(192, 12, 768, 3),
    "S": TransformerShape(384, 12, 1536, 6),
    "B": TransformerShape(768, 12, 3072, 12),
    "L": TransformerShape(1024, 24, 4096, 16),
    "So400m": TransformerShape(1152, 27, 4304, 16),
    "H": TransformerShape(1280, 32, 5120, 16),
    "g": TransformerShape(1408, 40, 6144, 16),
    "G": TransformerShape(1664, 48, 8192, 16),
}

DECODER_SHAPES: dict[str, TransformerShape] = {
    "B": TransformerShape(512, 12, 2048, 8),
    "L": TransformerShape(768, 12, 3072, 12),  # the OpenVision 2 default
    "H": TransformerShape(1024, 24, 4096, 16),
    "G": TransformerShape(1664, 48, 8192, 16),
}

PATCH_SIZES = (8, 14, 16)  # 8 only for the tiny CPU recipe's small images


def vit_shape(variant: str) -> tuple[TransformerShape, int]:
    """'L/14' -> (shape, patch size). Raises ValueError naming the valid choices."""
    name, _, patch = variant.partition("/")
    if name not in VIT_SHAPES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        choices = ", ".join(f"{n}/{p}" for n in VIT_SHAPES for p in (14, 16))
        raise ValueError(f"unknown ViT variant {variant!r}: use one of {choices} "
                         f"(patch sizes {PATCH_SIZES})")
    return VIT_SHAPES[name], int(patch)


def decoder_shape(variant: str) -> TransformerShape:
    if variant not in DECODER_SHAPES:
        raise ValueError(f"unknown decoder variant {variant!r}: use one of {list(DECODER_SHAPES)}")
    return DECODER_SHAPES[variant]


def encoder_parameter_count(shape: TransformerShape, patch: int, image_size: int,
                            in_channels: int = 3, class_token: bool = True,
                            num_registers: int = 0, learned_pos: bool = False) -> int:
    """Exact parameter count of the ViT encoder as built here (final norm included)."""
    w, m = shape.width, shape.mlp_dim
    layer = (4 * w * w + 4 * w) + (2 * w * m + m + w) + 4 * w  # attention, MLP, two LNs
    patches = (image_size // patch) ** 2
    tokens = (int(class_token) + num_registers + (patches if learned_pos else 0)) * w
    return in_channels * patch * patch * w + tokens + shape.depth * layer + 2 * w


def decoder_parameter_count(shape: TransformerShape, encoder_width: int, vocab: int,
                            positions: int = 0) -> int:
    """Exact parameter count of the caption decoder (projection, embedding, layers, head)."""
    d, m = shape.width, shape.mlp_dim
    layer = (4 * d * d + 4 * d) + (2 * d * m + m + d) + 4 * d
    return encoder_width * d + 2 * vocab * d + positions * d + shape.depth * layer + 2 * d
