"""Export to a Hugging Face transformers vision model: `config.json`, `model.safetensors` and
`preprocessor_config.json`, loadable with `AutoModel.from_pretrained(OUT)`.

Which class, and why. Our encoder is: patch conv, + positions on patch tokens only, [CLS;
registers; patches], pre-LN blocks with exact GELU, final LayerNorm, no norm before the
blocks. transformers has no single class that holds all of it for every size:
- `ViTModel` (chosen without registers, i.e. the OpenVision 2 reference): pre-LN
  (layernorm_before/after), final `layernorm`, hidden_act "gelu" (exact), configurable
  layer_norm_eps and an explicit `intermediate_size`, so every variant in the size table is
  exact, g/14 (MLP ratio 4.36) and So400m (3.74) included. Its position table has a CLS row:
  written as zeros, since our CLS gets no position. Its pooler (dense + activation) is
  written as the identity with pooler_act "linear", so `pooler_output` is the CLS output,
  like encode()'s pooled feature. It has no register tokens.
- `Dinov2WithRegistersModel` (chosen with registers): the same pre-LN block, CLS position
  row, register tokens inserted after the positions are added (so they get none, as ours)
  in our order [CLS, registers, patches]; its LayerScale is written as ones (x * 1.0 is
  exact), the unused mask token as zeros. transformers types its `mlp_ratio` as int, so
  register models need width | MLP width; other ones are refused with that reason.
- `CLIPVisionModel` is not exact: it always applies `pre_layrnorm` before the blocks.
  `SiglipVisionModel` has no CLS token. Both HF classes always have a CLS token, so models
  without one are refused.
Tensor names are the classic ones every ViT / DINOv2 checkpoint on the Hub uses
(`encoder.layer.N.attention.attention.query...`): transformers 4.x loads them as they are and
5.x renames them on load (its conversion mapping); the tests load them with 5.x.
"""

from __future__ import annotations

import json
import os

import torch

from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.atomic_output import staged_directory
from ov2_megatron.conversion.vision_tower import VisionTower, split_qkv


def model_class(tower: VisionTower) -> str:
    if tower.cls_token is None:
        raise ConversionError("vision.class_token is false: the HF ViT classes always prepend a "
                              "CLS token; export with timm instead")
    if tower.registers is None:
        return "ViTModel"
    if tower.mlp_dim % tower.width:
        raise ConversionError(
            f"{tower.num_registers} register tokens need Dinov2WithRegistersModel, whose "
            f"integer mlp_ratio cannot express MLP width {tower.mlp_dim} at width "
            f"{tower.width}; export with timm instead")
    return "Dinov2WithRegistersModel"


def _embeddings(tower: VisionTower) -> dict[str, torch.Tensor]:
    cls_row = torch.zeros(1, tower.width)  # our CLS token gets no position
    return {"embeddings.cls_token": tower.cls_token.reshape(1, 1, -1),
            "embeddings.position_embeddings": torch.cat([cls_row, tower.positions]).unsqueeze(0),
            "embeddings.patch_embeddings.projection.weight": tower.patch_weight,
            "embeddings.patch_embeddings.projection.bias": torch.zeros(tower.width)}


def _attention(prefix: str, block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights, biases = split_qkv(block)
    out = {}
    for name, w, b in zip(("query", "key", "value"), weights, biases):
        out[f"{prefix}.attention.attention.{name}.weight"] = w
        out[f"{prefix}.attention.attention.{name}.bias"] = b
    out[f"{prefix}.attention.output.dense.weight"] = block["attn.proj.weight"]
    out[f"{prefix}.attention.output.dense.bias"] = block["attn.proj.bias"]
    return out


def state_dict(tower: VisionTower) -> dict[str, torch.Tensor]:
    cls = model_class(tower)
    out = _embeddings(tower)
    vit = cls == "ViTModel"
    norm1, norm2 = ("layernorm_before", "layernorm_after") if vit else ("norm1", "norm2")
    fc1, fc2 = ("intermediate.dense", "output.dense") if vit else ("mlp.fc1", "mlp.fc2")
    for i, block in enumerate(tower.blocks):
        prefix = f"encoder.layer.{i}"
        out.update(_attention(prefix, block))
        for ours, theirs in (("ln1", norm1), ("ln2", norm2), ("mlp.fc1", fc1), ("mlp.fc2", fc2)):
            out[f"{prefix}.{theirs}.weight"] = block[f"{ours}.weight"]
            out[f"{prefix}.{theirs}.bias"] = block[f"{ours}.bias"]
        if not vit:
            out[f"{prefix}.layer_scale1.lambda1"] = torch.ones(tower.width)
            out[f"{prefix}.layer_scale2.lambda1"] = torch.ones(tower.width)
    out["layernorm.weight"], out["layernorm.bias"] = tower.norm_weight, tower.norm_bias
    if vit:  # identity pooler: pooler_output = CLS output
        out["pooler.dense.weight"] = torch.eye(tower.width)
        out["pooler.dense.bias"] = torch.zeros(tower.width)
    else:
        out["embeddings.mask_token"] = torch.zeros(1, tower.width)
        out["embeddings.register_tokens"] = tower.registers.unsqueeze(0)
    return {name: tensor.float().contiguous() for name, tensor in out.items()}


def config(tower: VisionTower) -> dict:
    cls = model_class(tower)
    common = dict(
        architectures=[cls], hidden_size=tower.width, num_hidden_layers=tower.depth,
        num_attention_heads=tower.num_heads, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.02,
        layer_norm_eps=tower.layernorm_eps, image_size=tower.image_size,
        patch_size=tower.patch_size, num_channels=tower.in_channels, qkv_bias=True,
        torch_dtype="float32")
    if cls == "ViTModel":
        return dict(common, model_type="vit", intermediate_size=tower.mlp_dim,
                    encoder_stride=tower.patch_size, pooler_act="linear",
                    pooler_output_size=tower.width)
    return dict(common, model_type="dinov2_with_registers",
                mlp_ratio=tower.mlp_dim // tower.width, layerscale_value=1.0,
                drop_path_rate=0.0, use_swiglu_ffn=False,
                num_register_tokens=tower.num_registers)


def preprocessor_config(tower: VisionTower) -> dict:
    """Resize to the square export resolution and normalise as in training."""
    return dict(image_processor_type="ViTImageProcessor", do_resize=True,
                size=dict(height=tower.image_size, width=tower.image_size), resample=3,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(tower.mean), image_std=list(tower.std))


def export(tower: VisionTower, output: str) -> str:
    from safetensors.torch import save_file

    cfg = config(tower)  # refuses before anything is written
    with staged_directory(output) as staging:
        save_file(state_dict(tower), os.path.join(staging, "model.safetensors"),
                  metadata={"format": "pt"})
        for name, content in (("config.json", cfg),
                              ("preprocessor_config.json", preprocessor_config(tower))):
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2)
    return output
