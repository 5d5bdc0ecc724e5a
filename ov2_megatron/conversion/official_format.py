"""Official OpenVision 2 parameters (UCSC-VLAA/OpenVision, JAX/flax) -> a standard state dict.

The official `openvision2_model.Model` holds a big_vision ViT (`img_encoder/...`) and the
`text_decoder_v2` caption decoder (`txt_decoder/...`, fusion_style 'concat'). Flattened with
'/' (the parity fixture's params.npz; a flax checkpoint flattened the same way, with or
without a leading 'params/'), its names map one to one onto models/state_dict_adapter.py's:

    img_encoder/embedding/kernel        [p, p, c, w] HWIO   -> vision.patch_embed.weight [w, c, p, p]
    img_encoder/cls                     [1, 1, w]           -> vision.cls_token [w]
    img_encoder/Transformer/encoderblock_{i}/
        LayerNorm_0, LayerNorm_1 {scale, bias}              -> vision.blocks.{i}.ln1, ln2
        MultiHeadDotProductAttention_0/{query,key,value}    -> attn.qkv (rows [q; k; v])
        MultiHeadDotProductAttention_0/out                  -> attn.proj
        MlpBlock_0/Dense_0, Dense_1                         -> mlp.fc1, mlp.fc2
    img_encoder/encoder_norm            (pooled feature)    -> vision.norm
    txt_decoder/Embed_0/embedding       [V, d]              -> decoder.tok_embed.weight
    txt_decoder/image_projection_layer/kernel [w, d]        -> decoder.img_proj.weight [d, w]
    txt_decoder/Transformer/encoderblock_{i}/...            -> decoder.blocks.{i}.* (as above)
    txt_decoder/decoder_norm                                -> decoder.norm
    txt_decoder/head/kernel             [d, V]              -> decoder.head.weight [V, d]

Flax Dense kernels are [in, out] (torch weights are [out, in]); attention kernels are either
2-D [in, heads*hd] / [heads*hd, out] or DenseGeneral's 3-D [in, heads, hd] / [heads, hd, out],
heads major in both. The fixed sin-cos position table (the CLS row is zero) is not a
parameter. Every layout change is linear, so official *gradients* map the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

from ov2_megatron.conversion import ConversionError

_BLOCK = re.compile(r"^(img_encoder|txt_decoder)/Transformer/encoderblock_(\d+)/(.+)$")
_TOWER = {"img_encoder": "vision", "txt_decoder": "decoder"}
_NORMS = {"LayerNorm_0": "ln1", "LayerNorm_1": "ln2"}
_DENSE = {"MlpBlock_0/Dense_0": "mlp.fc1", "MlpBlock_0/Dense_1": "mlp.fc2"}
_ATTENTION = "MultiHeadDotProductAttention_0"


def standard_from_flax(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Flattened official parameters (or gradients) -> standard names and torch layouts.
    Raises ConversionError naming any key that has no counterpart or is missing."""
    flat = {name.removeprefix("params/"): np.asarray(value) for name, value in params.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for name, value in flat.items():
        block = _BLOCK.match(name)
        if block:
            tower, index, part = block.groups()
            _block_tensor(out, qkv, f"{_TOWER[tower]}.blocks.{int(index)}", part, value, name)
        else:
            _other_tensor(out, name, value)
    for prefix, parts in qkv.items():
        missing = {"query", "key", "value"} - parts.keys()
        if missing:
            raise ConversionError(f"{prefix}: official attention lacks {sorted(missing)}")
        for leaf in ("weight", "bias"):
            out[f"{prefix}.attn.qkv.{leaf}"] = torch.cat(
                [parts[p][leaf] for p in ("query", "key", "value")])
    return out


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def _dense_weight(kernel: np.ndarray) -> torch.Tensor:
    """flax [in, out] -> torch [out, in]."""
    return _tensor(kernel).t().contiguous()


def _block_tensor(out: dict, qkv: dict, prefix: str, part: str, value: np.ndarray,
                  name: str) -> None:
    module, _, leaf = part.rpartition("/")
    if module in _NORMS and leaf in ("scale", "bias"):
        out[f"{prefix}.{_NORMS[module]}.{'weight' if leaf == 'scale' else 'bias'}"] = _tensor(value)
    elif module in _DENSE and leaf in ("kernel", "bias"):
        out[f"{prefix}.{_DENSE[module]}.{'weight' if leaf == 'kernel' else 'bias'}"] = (
            _dense_weight(value) if leaf == "kernel" else _tensor(value))
    elif module.startswith(_ATTENTION + "/") and leaf in ("kernel", "bias"):
        projection = module.split("/", 1)[1]
        if projection == "out":  # [heads*hd, w] or [heads, hd, w]
            kernel_or_bias = value.reshape(-1, value.shape[-1]) if leaf == "kernel" else value
            out[f"{prefix}.attn.proj.{'weight' if leaf == 'kernel' else 'bias'}"] = (
                _dense_weight(kernel_or_bias) if leaf == "kernel" else _tensor(value))
        elif projection in ("query", "key", "value"):
            if leaf == "kernel":  # [w, heads*hd] or [w, heads, hd]
                tensor = _dense_weight(value.reshape(value.shape[0], -1))
            else:
                tensor = _tensor(value.reshape(-1))
            qkv.setdefault(prefix, {}).setdefault(projection, {})[
                "weight" if leaf == "kernel" else "bias"] = tensor
        else:
            raise ConversionError(f"{name}: unexpected attention projection {projection!r}")
    else:
        raise ConversionError(f"{name}: no counterpart in this model (an official variant "
                              "with other blocks, e.g. layer scale or MAP pooling?)")


def _other_tensor(out: dict, name: str, value: np.ndarray) -> None:
    norms = {"img_encoder/encoder_norm": "vision.norm", "txt_decoder/decoder_norm": "decoder.norm"}
    module, _, leaf = name.rpartition("/")
    if module in norms and leaf in ("scale", "bias"):
        out[f"{norms[module]}.{'weight' if leaf == 'scale' else 'bias'}"] = _tensor(value)
    elif name == "img_encoder/embedding/kernel":  # HWIO -> OIHW
        out["vision.patch_embed.weight"] = _tensor(value.transpose(3, 2, 0, 1))
    elif name == "img_encoder/cls":
        out["vision.cls_token"] = _tensor(value.reshape(-1))
    elif name == "txt_decoder/Embed_0/embedding":
        out["decoder.tok_embed.weight"] = _tensor(value)
    elif name == "txt_decoder/image_projection_layer/kernel":
        out["decoder.img_proj.weight"] = _dense_weight(value)
    elif name == "txt_decoder/head/kernel":
        out["decoder.head.weight"] = _dense_weight(value)
    elif name == "img_encoder/embedding/bias":
        raise ConversionError(f"{name}: the official config used here has emb_head_bias=False "
                              "(no patch-embedding bias); this checkpoint has one")
    else:
        raise ConversionError(f"{name}: no counterpart in this model")
