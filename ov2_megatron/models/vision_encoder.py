"""ViT input: patch embedding, position embedding, CLS and register tokens.

images [b, c, H, W] -> tokens [s, b, w] (sequence-first, megatron's layout), with
s = CLS + registers + patches + alignment padding. Patch tokens get the fixed 2-D sin-cos
table of big_vision (or a learned table); CLS and registers get none. The layers themselves
are megatron TransformerBlocks (stage_block.py); they need an attention mask only when the
sequence carries padding (SP/FP8 alignment): `key_padding_mask` hides the padding positions
as keys, so every real token computes exactly what it computes without them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from ov2_megatron.config import SequenceGeometry, VisionConfig


def sincos_table(grid: int, width: int) -> torch.Tensor:
    """big_vision's posemb_sincos_2d: [grid*grid, width] = [sin x, cos x, sin y, cos y].

    Computed in float64 so the table is identical wherever it is regenerated (84 -> 224 px)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    x = x.reshape(-1, 1) * omega  # [n, w/4]
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # [n, w]


def interpolate_pos_embed(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a learned [n, w] position table to new_grid^2 rows (bicubic, as timm does)."""
    old_grid = int(round(table.shape[0] ** 0.5))
    if old_grid * old_grid != table.shape[0]:
        raise ValueError(f"position table with {table.shape[0]} rows is not a square grid")
    if old_grid == new_grid:
        return table
    grid = table.T.reshape(1, -1, old_grid, old_grid).float()  # [1, w, g, g]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new_grid * new_grid).T.to(table.dtype)  # [n', w]


class VisionEmbedding(MegatronModule):
    """Replicated on TP ranks (it is small); scattered along the sequence under SP."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig, geom: SequenceGeometry,
                 patch_size: int):
        super().__init__(config=config)
        width = config.hidden_size
        self.geom = geom
        self.image_size, self.patch_size = vision.image_size, patch_size
        self.in_channels, self.pos_kind = vision.in_channels, vision.pos_embed
        self.patch_embed = torch.nn.Conv2d(vision.in_channels, width, patch_size, patch_size,
                                           bias=False, dtype=config.params_dtype)
        self.cls_token = (torch.nn.Parameter(torch.zeros(width, dtype=config.params_dtype))
                          if vision.class_token else None)
        self.registers = (torch.nn.Parameter(torch.zeros(geom.num_registers, width,
                                                         dtype=config.params_dtype))
                          if geom.num_registers else None)
        self.pos_embed = (torch.nn.Parameter(torch.zeros(geom.num_patches, width,
                                                         dtype=config.params_dtype))
                          if vision.pos_embed == "learned" else None)
        for param in self.parameters():
            config.init_method(param.data)

    def position_table(self, grid: int, like: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None:
            return sincos_table(grid, like.shape[-1]).to(like.device, like.dtype)
        return interpolate_pos_embed(self.pos_embed, grid)

    def forward(self, images: torch.Tensor, any_resolution: bool = False) -> torch.Tensor:
        """[b, c, H, W] -> [s(/tp), b, w], s = prefix + patches + padding. Training needs the
        configured resolution (the sequence geometry depends on it); feature extraction may use
        any multiple of the patch."""
        self._check(images, any_resolution)
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # [b, w, g, g]
        grid = patches.shape[-1]
        x = patches.flatten(2).permute(2, 0, 1)  # [n, b, w], row-major patch order
        x = x + self.position_table(grid, x).unsqueeze(1)
        prefix = [t for t in (self.cls_token, self.registers) if t is not None]
        if prefix:
            tokens = torch.cat([t.reshape(-1, t.shape[-1]) for t in prefix])  # [p, w]
            x = torch.cat([tokens.unsqueeze(1).expand(-1, x.shape[1], -1), x])  # [p + n, b, w]
        padding = self.geom.padding(x.shape[0])
        if padding:  # zeros: finite through every layer, and no real token attends to them
            x = torch.cat([x, x.new_zeros(padding, *x.shape[1:])])  # [s, b, w]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)  # [s/tp, b, w]
        return x

    def real_tokens(self, images: torch.Tensor) -> int:
        """Real (unpadded) tokens of the sequence `forward(images)` returns."""
        grid = images.shape[-1] // self.patch_size
        return self.geom.vit_prefix + grid * grid

    def _check(self, images: torch.Tensor, any_resolution: bool) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected "
                             f"[batch, {self.in_channels}, {self.image_size}, {self.image_size}]")
        h, w = images.shape[-2:]
        if not any_resolution and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images of {h}x{w} px: this model is configured for "
                             f"{self.image_size}x{self.image_size} (vision.image_size)")
        if h != w or h % self.patch_size:
            raise ValueError(f"images of {h}x{w} px: expected square images whose side is a "
                             f"multiple of the patch size {self.patch_size} "
                             f"(configured vision.image_size {self.image_size})")


def key_padding_mask(real: int, seq: int, batch: int, impl: str,
                     device: torch.device) -> torch.Tensor | None:
    """Attention mask (True = hidden) that hides positions [real, seq) as keys, or None when
    there are none. Transformer Engine's 'padding' mask type takes [b, 1, 1, s]; megatron's
    local softmax (torch and fused CUDA kernels alike) takes a [1, 1, s, s] mask."""
    if real == seq:
        return None
    hidden = torch.arange(seq, device=device) >= real  # [s]
    if impl == "transformer_engine":
        return hidden.view(1, 1, 1, seq).expand(batch, 1, 1, seq).contiguous()
    return hidden.view(1, 1, 1, seq).expand(1, 1, seq, seq).contiguous()
