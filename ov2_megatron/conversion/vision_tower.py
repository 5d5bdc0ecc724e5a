"""The encoder of a standard state dict as every external ViT format sees it.

Our ViT (the official OpenVision 2 one): patch conv (no bias) -> + position table on the patch
tokens only -> [CLS; registers; patches] -> pre-LN blocks (exact GELU), with no LayerNorm
before the blocks and none on the output tokens. Its two features, which every export must
reproduce:
    patch tokens  the raw output of the last block, CLS and registers dropped (what the
                  caption decoder was trained on)
    pooled        LN(mean of the patch tokens), `pooled_norm` (official pool_type 'gap' +
                  encoder_norm); the only LayerNorm after the blocks
The position table is materialised at the export resolution: the fixed sin-cos table is
regenerated for that grid and a learned one is resized with the same bicubic interpolation
encode() uses, so an export equals encode() exactly at that resolution. (Other formats resize
a stored table their own way at other resolutions; only there can they differ from encode().)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ov2_megatron.conversion import ConversionError
from ov2_megatron.data.preprocess import EvalTransform
from ov2_megatron.models.vision_encoder import interpolate_pos_embed, sincos_table
from ov2_megatron.training.run_config import RunConfig

BLOCK_PARTS = ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias")


@dataclass
class VisionTower:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    in_channels: int
    image_size: int
    """The resolution `positions` is materialised for."""
    layernorm_eps: float
    patch_weight: torch.Tensor  # [w, c, p, p]
    cls_token: torch.Tensor | None  # [w]
    registers: torch.Tensor | None  # [R, w]
    positions: torch.Tensor  # [grid^2, w], added to the patch tokens only
    blocks: list[dict[str, torch.Tensor]]  # BLOCK_PARTS -> tensor, qkv rows [q; k; v]
    pooled_norm_weight: torch.Tensor  # the LayerNorm of the pooled feature only
    pooled_norm_bias: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    """The evaluation resize the export's image-processor configs declare (data/preprocess.py)."""

    @property
    def transform(self) -> EvalTransform:
        """The one evaluation transform, at the export resolution; every format's
        preprocessing config is derived from it."""
        return EvalTransform(self.image_size, self.mean, self.std, self.resize)

    @property
    def num_registers(self) -> int:
        return 0 if self.registers is None else self.registers.shape[0]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token is not None) + self.num_registers


def from_standard(standard: dict[str, torch.Tensor], run: RunConfig,
                  image_size: int | None = None, resize: str = "squash") -> VisionTower:
    vision = run.model.vision
    vit, patch = vision.shape()
    size = image_size or vision.image_size
    if size % patch:
        raise ConversionError(f"--image-size {size} is not a multiple of the patch size {patch}")
    grid = size // patch
    if vision.pos_embed == "learned":
        positions = interpolate_pos_embed(standard["vision.pos_embed"], grid)
    else:
        positions = sincos_table(grid, vit.width).float()
    return VisionTower(
        width=vit.width, depth=vit.depth, mlp_dim=vit.mlp_dim, num_heads=vit.num_heads,
        patch_size=patch, in_channels=vision.in_channels, image_size=size,
        layernorm_eps=run.model.layernorm_eps,
        patch_weight=standard["vision.patch_embed.weight"],
        cls_token=standard.get("vision.cls_token"),
        registers=standard["vision.registers"] if vision.num_registers else None,
        positions=positions.contiguous(),
        blocks=[{part: standard[f"vision.blocks.{i}.{part}"] for part in BLOCK_PARTS}
                for i in range(vit.depth)],
        pooled_norm_weight=standard["vision.norm.weight"],
        pooled_norm_bias=standard["vision.norm.bias"],
        mean=tuple(run.data.mean), std=tuple(run.data.std), resize=resize)


def exact_mlp_ratio(width: int, mlp_dim: int) -> float:
    """A float r with int(width * r) == mlp_dim (how timm and HF size the MLP): mlp/width can
    fall just below in floating point (4304/1152 -> 4303), so nudge it up until it does not."""
    ratio = mlp_dim / width
    for _ in range(8):
        if int(width * ratio) == mlp_dim:
            return ratio
        ratio = float(torch.nextafter(torch.tensor(ratio, dtype=torch.float64),
                                      torch.tensor(float("inf"), dtype=torch.float64)))
    raise ConversionError(f"no float MLP ratio gives {mlp_dim} hidden units at width {width}")


def split_qkv(block: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The fused [q; k; v] rows -> ([wq, wk, wv], [bq, bk, bv])."""
    return (list(block["attn.qkv.weight"].chunk(3, dim=0)),
            list(block["attn.qkv.bias"].chunk(3, dim=0)))
