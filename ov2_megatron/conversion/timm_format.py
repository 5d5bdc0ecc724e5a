"""Export to a timm `VisionTransformer`: `config.json` + `model.safetensors`, the layout timm
itself pushes to the Hugging Face Hub, so the folder loads with

    timm.create_model("local-dir:OUT", pretrained=True)      # or hf-hub:ORG/NAME once pushed

and `model.forward_features(x)[:, model.num_prefix_tokens:]` equals encode()'s patch tokens
(the raw output of the last block), `model.forward_head(model.forward_features(x),
pre_logits=True)` its pooled feature LN(mean of the patch tokens). timm expresses the
official model exactly, so there is nothing to approximate (transformers' AutoModel loads the
same folder as a TimmWrapperModel: hf_format.py).

How our encoder maps onto VisionTransformer's arguments:
- class_token / reg_tokens as ours, `no_embed_class=True`: positions on patch tokens only,
  CLS and registers concatenated in front after the positions are added (timm's order is
  [CLS, registers, patches], as ours);
- `pos_embed='learn'` holding our table at the export resolution (a sin-cos table is just
  data to timm); `dynamic_img_size=True` lets timm run other resolutions by resizing it;
- `pre_norm=False` (no norm before the blocks); `global_pool='avg'` with `fc_norm=True` and
  `final_norm=True`: timm then builds `norm` as Identity (no LayerNorm on the tokens) and
  `fc_norm` as the LayerNorm after pooling, which holds our pooled norm; 'avg' pooling
  averages tokens [num_prefix_tokens:] (pool_include_prefix defaults to False), i.e. the
  patch tokens without CLS and registers, as encode() does;
- timm's patch conv always has a bias here (`bias = not pre_norm`): written as zeros;
- Attention (qkv rows [q; k; v], biases), Mlp with nn.GELU (exact), LayerNorm eps 1e-6 are
  timm's defaults; another eps cannot be expressed in config.json and is refused.
- pretrained_cfg's interpolation / crop_pct / crop_mode / mean / std come from the one
  evaluation transform (data/preprocess.py, `data_config` below);
- `num_classes` only at the top level of config.json (timm reads it there; in model_args it
  would clash with the num_classes=0 transformers' TimmWrapperModel passes itself).
"""

from __future__ import annotations

import json
import os

import torch

from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.atomic_output import staged_directory
from ov2_megatron.conversion.vision_tower import VisionTower, exact_mlp_ratio
from ov2_megatron.data.preprocess import EvalTransform

TIMM_LAYERNORM_EPS = 1e-6
# Any registered ViT name builds a VisionTransformer; every argument is given explicitly.
ARCHITECTURE = "vit_base_patch16_224"


def state_dict(tower: VisionTower) -> dict[str, torch.Tensor]:
    out = {"patch_embed.proj.weight": tower.patch_weight,
           "patch_embed.proj.bias": torch.zeros(tower.width),
           "pos_embed": tower.positions.unsqueeze(0)}  # [1, n, w]
    if tower.cls_token is not None:
        out["cls_token"] = tower.cls_token.reshape(1, 1, -1)
    if tower.registers is not None:
        out["reg_token"] = tower.registers.unsqueeze(0)  # [1, R, w]
    ours_to_timm = {"ln1": "norm1", "ln2": "norm2", "attn.qkv": "attn.qkv",
                    "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i, block in enumerate(tower.blocks):
        for part, tensor in block.items():
            module, leaf = part.rsplit(".", 1)
            out[f"blocks.{i}.{ours_to_timm[module]}.{leaf}"] = tensor
    out["fc_norm.weight"], out["fc_norm.bias"] = tower.pooled_norm_weight, tower.pooled_norm_bias
    return {name: tensor.float().contiguous() for name, tensor in out.items()}


def config(tower: VisionTower) -> dict:
    if tower.layernorm_eps != TIMM_LAYERNORM_EPS:
        raise ConversionError(f"model.layernorm_eps {tower.layernorm_eps}: timm's ViT config can "
                              f"only express LayerNorm eps {TIMM_LAYERNORM_EPS}; use export-hf "
                              "--hf-class vit")
    model_args = dict(
        img_size=tower.image_size, patch_size=tower.patch_size, in_chans=tower.in_channels,
        embed_dim=tower.width, depth=tower.depth, num_heads=tower.num_heads,
        mlp_ratio=exact_mlp_ratio(tower.width, tower.mlp_dim), qkv_bias=True,
        class_token=tower.cls_token is not None, reg_tokens=tower.num_registers,
        no_embed_class=True, pos_embed="learn", pre_norm=False, final_norm=True,
        fc_norm=True, global_pool="avg", dynamic_img_size=True)
    size = tower.image_size
    pretrained_cfg = dict(
        tag="ov2_megatron", custom_load=False, input_size=[tower.in_channels, size, size],
        fixed_input_size=False, **data_config(tower.transform), num_classes=0,
        pool_size=None, first_conv="patch_embed.proj", classifier="head")
    return dict(architecture=ARCHITECTURE, num_classes=0, num_features=tower.width,
                global_pool="avg", model_args=model_args, pretrained_cfg=pretrained_cfg)


def data_config(transform: EvalTransform) -> dict:
    """pretrained_cfg's preprocessing keys: timm's `resolve_data_config` + `create_transform`
    (and transformers' TimmWrapperImageProcessor, which calls them) then apply `transform`.
    crop_pct 1.0 makes the scale size floor(S / 1.0) = S: 'squash' resizes to (S, S) and its
    crop is a no-op; 'center' resizes the shorter side to S and crops the centre."""
    return dict(interpolation=transform.interpolation, crop_pct=1.0,
                crop_mode="squash" if transform.resize == "squash" else "center",
                mean=list(transform.mean), std=list(transform.std))


def export(tower: VisionTower, output: str) -> str:
    from safetensors.torch import save_file

    cfg = config(tower)  # refuses before anything is written
    with staged_directory(output) as staging:
        save_file(state_dict(tower), os.path.join(staging, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    return output
