"""Export to Hugging Face transformers: a folder that `AutoModel.from_pretrained(OUT)` loads.
Two classes (`export-hf --hf-class`):

timm_wrapper (default; the official features exactly). transformers' `TimmWrapperModel`
builds a timm model from config.json (`architecture`, `model_args`, `pretrained_cfg`) and
returns `last_hidden_state = forward_features(x)`, `pooler_output = forward_head(...)`. timm
holds our encoder exactly (timm_format.py), so the folder is the timm export plus
`model_type: "timm_wrapper"`, `architectures` and `do_pooling`; it still loads in timm too.
transformers adds the `timm_model.` prefix to every tensor name on load (its conversion
mapping); the tests check that no tensor is missing, unexpected or altered. With
P = model.timm_model.num_prefix_tokens (CLS + registers):
    last_hidden_state[:, P:]   = encode()'s patch tokens (raw output of the last block)
    pooler_output              = encode()'s pooled feature, LN(mean of the patch tokens)
    hidden_states[i]           (output_hidden_states=True) the output of block i+1 as a
                               [b, w, g, g] map without prefix tokens (timm's
                               forward_intermediates); hidden_states[-1] is the patch tokens
AutoImageProcessor gives TimmWrapperImageProcessor, which runs timm's own transform from
pretrained_cfg (the one evaluation transform, timm_format.data_config); no
preprocessor_config.json is needed. Requires timm beside transformers.

vit (native classes; two outputs are NOT the official features). `ViTModel` without registers,
`Dinov2WithRegistersModel` with them: pre-LN blocks, exact GELU, configurable eps, CLS
position row written as zeros (our CLS gets no position). Both classes apply their final
`layernorm` to every token, while our only LayerNorm after the blocks is the pooled one; it is
written there, so:
    last_hidden_state          layernorm(every token): NOT our patch tokens (ours carry none)
    pooler_output              LN(CLS output) (ViTModel: through an identity dense with
                               pooler_act 'linear'; Dinov2: last_hidden_state[:, 0]): NOT our
                               pooled feature, which is LN(mean of the patch tokens)
  the official features instead, exact (P = 1 + registers):
    hidden_states[-1][:, P:]   (output_hidden_states=True) = patch tokens: hidden_states[0] is
                               the embedding output, hidden_states[i] that of block i
    model.layernorm(hidden_states[-1][:, P:].mean(1)) = pooled feature
  ViTModel has no register tokens. Dinov2WithRegistersModel inserts them after the positions
  are added (so they get none, as ours) in our order [CLS, registers, patches]; its LayerScale
  is written as ones (x * 1.0 is exact), the unused mask token as zeros; transformers types
  its `mlp_ratio` as int, so register models need width | MLP width. Both always have a CLS
  token: models without one are refused. Tensor names are the classic ones of every ViT /
  DINOv2 checkpoint on the Hub (`encoder.layer.N.attention.attention.query...`), which 5.x
  renames on load. preprocessor_config.json applies the one evaluation transform
  (data/preprocess.py; `preprocessor_config` below).

Ruled out: `CLIPVisionModel` always applies `pre_layrnorm` before the blocks;
`SiglipVisionModel` has no CLS token.
"""

from __future__ import annotations

import json
import os

import torch

from ov2_megatron.conversion import ConversionError, timm_format
from ov2_megatron.conversion.atomic_output import staged_directory
from ov2_megatron.conversion.vision_tower import VisionTower, split_qkv
from ov2_megatron.data.preprocess import EvalTransform

HF_CLASSES = ("timm_wrapper", "vit")


def model_class(tower: VisionTower, hf_class: str = "timm_wrapper") -> str:
    if hf_class not in HF_CLASSES:
        raise ConversionError(f"--hf-class {hf_class!r}: use one of {', '.join(HF_CLASSES)}")
    if hf_class == "timm_wrapper":
        return "TimmWrapperModel"
    if tower.cls_token is None:
        raise ConversionError("vision.class_token is false: the native HF ViT classes always "
                              "prepend a CLS token; use --hf-class timm_wrapper")
    if tower.registers is None:
        return "ViTModel"
    if tower.mlp_dim % tower.width:
        raise ConversionError(
            f"{tower.num_registers} register tokens need Dinov2WithRegistersModel, whose "
            f"integer mlp_ratio cannot express MLP width {tower.mlp_dim} at width "
            f"{tower.width}; use --hf-class timm_wrapper")
    return "Dinov2WithRegistersModel"


def feature_note(tower: VisionTower, hf_class: str) -> str:
    """Where the exported model's outputs hold encode()'s two features."""
    p = tower.num_prefix_tokens
    if model_class(tower, hf_class) == "TimmWrapperModel":
        return f"patch tokens = last_hidden_state[:, {p}:], pooled = pooler_output"
    return (f"patch tokens = hidden_states[-1][:, {p}:] (output_hidden_states=True), pooled = "
            f"model.layernorm(hidden_states[-1][:, {p}:].mean(1)); last_hidden_state is "
            "LayerNorm'd per token and pooler_output is LN(CLS): neither is an official feature")


def timm_wrapper_config(tower: VisionTower) -> dict:
    return dict(timm_format.config(tower), model_type="timm_wrapper",
                architectures=["TimmWrapperModel"], do_pooling=True)


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


def native_state_dict(tower: VisionTower) -> dict[str, torch.Tensor]:
    cls = model_class(tower, "vit")
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
    # Our pooled norm, the only one after the blocks; these classes apply it to every token.
    out["layernorm.weight"] = tower.pooled_norm_weight
    out["layernorm.bias"] = tower.pooled_norm_bias
    if vit:  # identity pooler: pooler_output = layernorm(CLS output)
        out["pooler.dense.weight"] = torch.eye(tower.width)
        out["pooler.dense.bias"] = torch.zeros(tower.width)
    else:
        out["embeddings.mask_token"] = torch.zeros(1, tower.width)
        out["embeddings.register_tokens"] = tower.registers.unsqueeze(0)
    return {name: tensor.float().contiguous() for name, tensor in out.items()}


def native_config(tower: VisionTower) -> dict:
    cls = model_class(tower, "vit")
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


def preprocessor_config(transform: EvalTransform) -> dict:
    """preprocessor_config.json for the native classes: ViTImageProcessor resizing to (S, S),
    which is `transform` (data/preprocess.py) for the default 'squash'; resample 2 is PIL
    bilinear, 3 bicubic. transformers 5's PIL backend (AutoImageProcessor.from_pretrained(DIR,
    backend="pil"); transformers 4's default) gives our pixels exactly; its default
    torchvision backend resizes slightly differently, up to one uint8 step per pixel
    (features then differ by ~5e-3 on the test photo: tests/conversion/
    test_preprocess_parity.py). The default timm_wrapper export has no such caveat.

    'shortest' is refused: transformers' centre crop starts at floor((side - S) / 2), the
    torchvision crop that timm and open_clip run (and we follow) at round(), so on an odd
    margin every HF processor is one pixel off; the timm_wrapper export runs timm's own."""
    if transform.resize != "squash":
        raise ConversionError(
            f"--resize {transform.resize} with --hf-class vit: transformers' image processors "
            "crop at floor((side - S) / 2), not at round() as torchvision, timm and open_clip "
            "(and tools/extract_features.py) do, so they cannot reproduce it; use the default "
            "--hf-class timm_wrapper, whose processor is timm's transform")
    resample = {"bilinear": 2, "bicubic": 3}[transform.interpolation]
    return dict(image_processor_type="ViTImageProcessor", do_resize=True,
                size=dict(height=transform.size, width=transform.size), resample=resample,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(transform.mean), image_std=list(transform.std),
                do_convert_rgb=True)


def export(tower: VisionTower, output: str, hf_class: str = "timm_wrapper") -> str:
    from safetensors.torch import save_file

    # Everything that can refuse runs before anything is written.
    if model_class(tower, hf_class) == "TimmWrapperModel":
        files = {"config.json": timm_wrapper_config(tower)}
        weights = timm_format.state_dict(tower)
    else:
        files = {"config.json": native_config(tower),
                 "preprocessor_config.json": preprocessor_config(tower.transform)}
        weights = native_state_dict(tower)
    with staged_directory(output) as staging:
        save_file(weights, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2)
    return output
