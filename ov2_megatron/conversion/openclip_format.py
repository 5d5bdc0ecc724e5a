"""Import OpenCLIP ViT weights (the released OpenVision format: `open_clip_config.json` +
`open_clip_pytorch_model.bin`, vision-only or with a text tower) as a standard state dict and
the VisionConfig that holds them exactly.

The released OpenVision vision towers (the official repository's
src/convert_upload/open_clip/model_configs/openvision-vit-*.json) are configured as
`no_ln_pre: true`, `pool_type: "avg"`, `final_ln_after_pool: true`, `norm_kwargs.eps` 1e-6,
`head_width` 64 (72 / 80 for So400m / H), exact GELU. open_clip 3.3.0's VisionTransformer then
returns, with `output_tokens=True` and before `proj`:
    tokens  = x[:, 1:], the raw output of the last block without CLS (ln_post is not applied
              to the tokens when final_ln_after_pool is set)    = encode()'s patch tokens
    pooled  = ln_post(x[:, 1:].mean(1)), CLS excluded            = encode()'s pooled feature
which is our encoder exactly; `ln_post` becomes `vision.norm`, the pooled norm.

Piece by piece:
- conv1 (no bias), transformer.resblocks.N.{ln_1, attn.in_proj_* (rows [q; k; v]),
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}: one to one; ln_post -> vision.norm;
- class_embedding + positional_embedding[0] (the CLS row): both are constants added to the
  CLS token before the first block, so their sum becomes our CLS token (exact);
- positional_embedding[1:]: our fixed table if it equals big_vision's sin-cos table (within
  1e-6), else a learned table (OpenCLIP's own 'sin_cos_2d' is MAE's layout, a learned table
  to us);
- ls_1 / ls_2 layer scale: folded into out_proj / c_proj (gamma * (W x + b)), exact up to
  float rounding;
- proj (and the OpenVision fork's proj_bias), the contrastive projection of the pooled
  feature, is dropped: encode() returns the features before it, which LLaVA-style models use;
- LayerNorm eps from vision_cfg.norm_kwargs (OpenCLIP's default 1e-5 otherwise) becomes
  model.layernorm_eps; the mean/std of preprocess_cfg become data.mean/std.
Refused, naming the reason, because our encoder cannot hold them exactly: ln_pre (a LayerNorm
before the blocks: no_ln_pre unset, or ln_pre weights), pool_type 'tok' (pooled = LN(CLS)) or
'none', final_ln_after_pool unset (ln_post on every token: our tokens carry no LayerNorm),
attentional pooling, QuickGELU or tanh-GELU in the vision tower, custom attention blocks
(qk_norm, scaled cosine, head scales), timm or ResNet towers, non-square inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ov2_megatron.config import ParallelConfig
from ov2_megatron.conversion import ConversionError
from ov2_megatron.data.preprocess import EvalTransform
from ov2_megatron.models.vision_encoder import sincos_table
from ov2_megatron.training.run_config import RunConfig
from ov2_megatron.variants import PATCH_SIZES, VIT_SHAPES

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
OPENCLIP_DEFAULT_EPS = 1e-5
SINCOS_TOLERANCE = 1e-6
_UNSUPPORTED_FLAGS = ("attentional_pool", "qk_norm", "scaled_cosine_attn", "scale_heads",
                      "scale_attn_inner", "scale_attn", "scale_fc")
PROJECTIONS = ("proj", "proj_bias")  # the contrastive head on the pooled feature: dropped


@dataclasses.dataclass
class OpenClipVision:
    standard: dict[str, torch.Tensor]  # vision.* tensors, standard names
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int
    pos_embed: str  # 'sincos' or 'learned'
    layernorm_eps: float
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    notes: list[str]


def read(input_dir: str) -> OpenClipVision:
    config_path = os.path.join(input_dir, CONFIG_FILE)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{config_path}: cannot read the OpenCLIP config ({error})") from None
    if "model_cfg" not in config or "vision_cfg" not in config["model_cfg"]:
        raise ConversionError(f"{config_path} has no model_cfg.vision_cfg: not an OpenCLIP config")
    weights, notes = _read_visual_weights(input_dir)
    vision = _convert(weights, config["model_cfg"], config_path)
    preprocess = config.get("preprocess_cfg", {})
    vision.mean = tuple(preprocess["mean"]) if "mean" in preprocess else None
    vision.std = tuple(preprocess["std"]) if "std" in preprocess else None
    vision.notes = notes + vision.notes + _preprocess_notes(preprocess)
    return vision


def preprocess_cfg(transform: EvalTransform) -> dict:
    """The `preprocess_cfg` of open_clip_config.json (open_clip.transform.PreprocessCfg's
    fields) that makes open_clip's own eval transform apply `transform` (data/preprocess.py):
    its 'squash' is Resize((S, S)), its 'shortest' Resize(S) + CenterCrop(S), on PIL images."""
    return dict(size=transform.size, mode="RGB", mean=list(transform.mean),
                std=list(transform.std), interpolation=transform.interpolation,
                resize_mode=transform.resize, fill_color=0)


def _preprocess_notes(preprocess: dict) -> list[str]:
    """The evaluation resize a release declares, when it is not our default."""
    default = EvalTransform(1, (0.0,) * 3, (1.0,) * 3)
    resize = preprocess.get("resize_mode", "shortest")  # open_clip's default
    interpolation = preprocess.get("interpolation", "bicubic")
    if (resize, interpolation) == (default.resize, default.interpolation):
        return []
    return [f"preprocess_cfg declares resize_mode {resize!r}, interpolation "
            f"{interpolation!r}; features as its users see them need that transform "
            f"(tools/extract_features.py --resize {resize}; our default is "
            f"{default.interpolation} {default.resize})"]


def _read_visual_weights(input_dir: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    path = next((os.path.join(input_dir, name) for name in WEIGHT_FILES
                 if os.path.isfile(os.path.join(input_dir, name))), None)
    if path is None:
        raise ConversionError(f"{input_dir} holds none of {', '.join(WEIGHT_FILES)}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{path}: cannot read the weights ({type(error).__name__}: "
                              f"{error}); truncated or not a torch state dict?") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint rather than bare weights
    state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ConversionError(f"{path} holds no visual.* tensors: not an OpenCLIP ViT checkpoint")
    ignored = len(state) - len(visual)
    notes = [f"{ignored} tensors outside the vision tower (text tower, logit scale) ignored"] \
        if ignored else []
    return {k: v.float() for k, v in visual.items()}, notes


def _refuse_unsupported(model_cfg: dict, cfg: dict, where: str) -> None:
    reasons = []
    if model_cfg.get("quick_gelu"):
        reasons.append("quick_gelu: this model uses exact GELU")
    if cfg.get("timm_model_name") or isinstance(cfg.get("layers"), (list, tuple)):
        reasons.append("a timm or ResNet vision tower: only OpenCLIP's own ViT is supported")
    if not cfg.get("no_ln_pre"):
        reasons.append("no_ln_pre is not set: OpenCLIP applies ln_pre, a LayerNorm before the "
                       "blocks, which this model does not have")
    pool = cfg.get("pool_type", "tok")  # OpenCLIP's defaults
    if pool != "avg":
        reasons.append(f"pool_type {pool!r}: this model's pooled feature is LN(mean of the "
                       "patch tokens), pool_type 'avg'")
    if not cfg.get("final_ln_after_pool"):
        reasons.append("final_ln_after_pool is not set: OpenCLIP applies ln_post to every "
                       "token, while this model's tokens carry no LayerNorm (it normalises "
                       "only the pooled feature)")
    reasons += [f"{flag}: no counterpart in this model" for flag in _UNSUPPORTED_FLAGS
                if cfg.get(flag)]
    if cfg.get("block_type") not in (None, "default"):
        reasons.append(f"block_type {cfg['block_type']!r}: only the default block is supported")
    act = cfg.get("act_kwargs") or {}
    if any(k != "approximate" for k in act) or act.get("approximate", "none") != "none":
        reasons.append(f"act_kwargs {act}: this model uses exact GELU in the vision tower")
    norm = cfg.get("norm_kwargs") or {}
    if any(k != "eps" for k in norm):
        reasons.append(f"norm_kwargs {norm}: only eps is supported")
    if reasons:
        raise ConversionError(f"{where}: cannot be represented exactly: " + "; ".join(reasons))


def _convert(visual: dict[str, torch.Tensor], model_cfg: dict, where: str) -> OpenClipVision:
    cfg = model_cfg["vision_cfg"]
    _refuse_unsupported(model_cfg, cfg, where)
    if any(name.startswith("ln_pre.") for name in visual):
        raise ConversionError(f"{where}: cannot be represented exactly: visual.ln_pre is a "
                              "LayerNorm before the blocks, which this model does not have "
                              "(OpenVision 2 exports set vision_cfg.no_ln_pre)")
    pending = dict(visual)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in pending:
            raise ConversionError(f"{where}: visual.{name} {shape} missing from the weights")
        tensor = pending.pop(name)
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"{where}: visual.{name} has shape {tuple(tensor.shape)}, the "
                                  f"config needs {shape}")
        return tensor

    width, patch = cfg.get("width", 768), cfg.get("patch_size", 16)
    size = cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConversionError(f"{where}: image_size {size}: only square inputs are supported")
        size = size[0]
    head_width = cfg.get("head_width", 64)
    if width % head_width or size % patch:
        raise ConversionError(f"{where}: width {width} / head_width {head_width} or image_size "
                              f"{size} / patch_size {patch} is not whole")
    depth, grid = cfg.get("layers", 12), size // patch
    mlp = int(width * cfg.get("mlp_ratio", 4.0))
    eps = (cfg.get("norm_kwargs") or {}).get("eps", OPENCLIP_DEFAULT_EPS)
    out = {"vision.patch_embed.weight": take("conv1.weight", (width, 3, patch, patch))}
    cls = take("class_embedding", (width,))
    positions = take("positional_embedding", (grid * grid + 1, width))
    out["vision.cls_token"] = cls + positions[0]
    notes = ["the CLS position row is folded into the CLS token"]
    patch_rows = positions[1:]
    table = sincos_table(grid, width).float()
    if (patch_rows - table).abs().max() <= SINCOS_TOLERANCE:
        pos_kind = "sincos"
    else:
        pos_kind = "learned"
        out["vision.pos_embed"] = patch_rows.clone()
    for i in range(depth):
        out.update(_block(take, f"transformer.resblocks.{i}", f"vision.blocks.{i}", width, mlp,
                          pending, notes))
    out["vision.norm.weight"] = take("ln_post.weight", (width,))  # on the pooled feature only
    out["vision.norm.bias"] = take("ln_post.bias", (width,))
    dropped = [f"{name} {tuple(pending.pop(name).shape)}" for name in PROJECTIONS
               if name in pending]
    if dropped:
        notes.append(f"{', '.join(dropped)} (contrastive projection of the pooled feature) "
                     "dropped: encode() returns the features before it")
    if pending:
        raise ConversionError(f"{where}: unexpected tensors with no counterpart in this model: "
                              + ", ".join(f"visual.{k}" for k in sorted(pending)[:8]))
    return OpenClipVision(out, width, depth, mlp, width // head_width, patch, size, pos_kind, eps,
                          None, None, notes)


def _block(take, theirs: str, ours: str, width: int, mlp: int, pending: dict,
           notes: list[str]) -> dict[str, torch.Tensor]:
    out = {f"{ours}.ln1.weight": take(f"{theirs}.ln_1.weight", (width,)),
           f"{ours}.ln1.bias": take(f"{theirs}.ln_1.bias", (width,)),
           f"{ours}.attn.qkv.weight": take(f"{theirs}.attn.in_proj_weight", (3 * width, width)),
           f"{ours}.attn.qkv.bias": take(f"{theirs}.attn.in_proj_bias", (3 * width,)),
           f"{ours}.attn.proj.weight": take(f"{theirs}.attn.out_proj.weight", (width, width)),
           f"{ours}.attn.proj.bias": take(f"{theirs}.attn.out_proj.bias", (width,)),
           f"{ours}.ln2.weight": take(f"{theirs}.ln_2.weight", (width,)),
           f"{ours}.ln2.bias": take(f"{theirs}.ln_2.bias", (width,)),
           f"{ours}.mlp.fc1.weight": take(f"{theirs}.mlp.c_fc.weight", (mlp, width)),
           f"{ours}.mlp.fc1.bias": take(f"{theirs}.mlp.c_fc.bias", (mlp,)),
           f"{ours}.mlp.fc2.weight": take(f"{theirs}.mlp.c_proj.weight", (width, mlp)),
           f"{ours}.mlp.fc2.bias": take(f"{theirs}.mlp.c_proj.bias", (width,))}
    for scale, target in (("ls_1", "attn.proj"), ("ls_2", "mlp.fc2")):
        if f"{theirs}.{scale}.gamma" in pending:  # gamma * (W x + b) = (gamma W) x + gamma b
            gamma = take(f"{theirs}.{scale}.gamma", (width,))
            out[f"{ours}.{target}.weight"] = gamma[:, None] * out[f"{ours}.{target}.weight"]
            out[f"{ours}.{target}.bias"] = gamma * out[f"{ours}.{target}.bias"]
            if not any(n.startswith("layer scale") for n in notes):
                notes.append("layer scale (ls_1, ls_2) folded into out_proj and c_proj")
    return out


def target_run(vision: OpenClipVision, base: RunConfig, tp: int, pp: int) -> RunConfig:
    """`base` (a recipe stage) with the imported encoder's shape, at TP=tp, PP=pp."""
    shape = (vision.width, vision.depth, vision.mlp_dim, vision.num_heads)
    name = next((n for n, s in VIT_SHAPES.items()
                 if (s.width, s.depth, s.mlp_dim, s.num_heads) == shape),
                base.model.vision.variant.partition("/")[0])
    patch_in_name = vision.patch_size if vision.patch_size in PATCH_SIZES else PATCH_SIZES[-1]
    base.model.vision = dataclasses.replace(
        base.model.vision, variant=f"{name}/{patch_in_name}", image_size=vision.image_size,
        width=vision.width, depth=vision.depth, mlp_dim=vision.mlp_dim,
        num_heads=vision.num_heads, patch_size=vision.patch_size, in_channels=3,
        class_token=True, num_registers=0, pos_embed=vision.pos_embed, gelu_approximate="none")
    base.model.layernorm_eps = vision.layernorm_eps
    base.data.resolution = vision.image_size
    if vision.mean is not None:
        base.data.mean = vision.mean
    if vision.std is not None:
        base.data.std = vision.std
    base.parallel = ParallelConfig(tensor=tp, pipeline=pp)
    base.train.init_from = ""
    return base
