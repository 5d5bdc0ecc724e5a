"""A case computed by the official OpenVision 2 code, as this framework's inputs.

A case directory (laid out like tests/fixtures/openvision2_official/, see its README) holds
`meta.json` (geometry, the official loss), `params.npz` (flax parameters), `case.npz` (the
batch, the kept-token indices, reference activations) and `grads.npz` (d loss / d param).

Caption layout. The official decoder reads `labels[:, :L-1]` and predicts `autoreg_labels`
(those tokens shifted left by one, PAD appended), supervised where `cap_loss_mask` is set.
This model reads `tokens[:, :-1]` and predicts `tokens[:, 1:]` wherever the target is not
PAD, so `tokens = [labels[:, :1], autoreg_labels]` is the same batch exactly; the official
appended L-th token (`[CLS]`) is neither read nor predicted by either. The mask is checked
to be `autoreg_labels != PAD`, the rule this model applies.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ov2_megatron.config import DecoderConfig, ModelConfig, VisionConfig
from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.official_format import standard_from_flax

FILES = ("meta.json", "params.npz", "case.npz", "grads.npz")


@dataclass
class OfficialCase:
    meta: dict
    model: ModelConfig
    weights: dict[str, torch.Tensor]  # standard names
    grads: dict[str, torch.Tensor]  # standard names, d(official loss)/d(weight)
    images: torch.Tensor  # [b, c, H, W], normalised
    tokens: torch.Tensor  # [b, L] int64
    keep_idx: torch.Tensor  # [b, k] int64, in the official drawn order
    activations: dict[str, np.ndarray]  # case.npz's reference activations

    @property
    def loss(self) -> float:
        return float(self.meta["loss"])


def load(directory: str) -> OfficialCase:
    missing = [name for name in FILES if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ConversionError(f"{directory}: not an official case directory, missing "
                              f"{', '.join(missing)}")
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    arrays = {name: read_npz(os.path.join(directory, name)) for name in FILES[1:]}
    case = arrays["case.npz"]
    tokens = caption_tokens(case, int(meta["PAD"]), directory)
    model = model_config(meta)
    keep_idx = torch.from_numpy(case["keep_idx"].astype(np.int64))
    if keep_idx.shape[1] != int(meta["num_kept"]):
        raise ConversionError(f"{directory}: keep_idx has {keep_idx.shape[1]} columns, "
                              f"meta.json num_kept {meta['num_kept']}")
    images = torch.from_numpy(np.ascontiguousarray(case["images"].transpose(0, 3, 1, 2)))
    return OfficialCase(meta, model, standard_from_flax(arrays["params.npz"]),
                        standard_from_flax(arrays["grads.npz"]), images.float(), tokens,
                        keep_idx, {k: case[k] for k in case if k not in ("images", "labels")})


def model_config(meta: dict, loss_weight: float = 2.0) -> ModelConfig:
    """The official model of `meta.json` as this framework's config (sizes as overrides);
    `loss_weight` is the official `coca_caption_loss_weight` (2 in the official config)."""
    return ModelConfig(
        vision=VisionConfig(variant="Ti/16", image_size=meta["RES"], patch_size=meta["PATCH"],
                            width=meta["WIDTH"], depth=meta["DEPTH"], mlp_dim=meta["MLP"],
                            num_heads=meta["HEADS"], class_token=True, num_registers=0,
                            pos_embed="sincos", keep_ratio=meta["keep_ratio"],
                            gelu_approximate="none"),
        decoder=DecoderConfig(variant="B", width=meta["DW"], depth=meta["DD"],
                              mlp_dim=meta["DMLP"], num_heads=meta["DHEADS"],
                              vocab_size=meta["VOCAB"], vocab_pad_multiple=128,
                              caption_length=meta["TOKEN_LEN"], pad_id=meta["PAD"],
                              mask="causal", pos_embed="none", loss_weight=loss_weight,
                              gelu_approximate="tanh"),
        layernorm_eps=1e-6, transformer_impl="local")


def read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a readable .npz ({error})") from None


def caption_tokens(case: dict, pad: int, where: str) -> torch.Tensor:
    """This model's [b, L] tokens from the official labels / autoreg_labels / cap_loss_mask
    (the layout in the module docstring); `where` names the source in errors."""
    labels, targets = case["labels"].astype(np.int64), case["autoreg_labels"].astype(np.int64)
    if not np.array_equal(case["cap_loss_mask"].astype(bool), targets != pad):
        raise ConversionError(f"{where}: cap_loss_mask is not autoreg_labels != PAD ({pad}); "
                              "this model supervises exactly the non-PAD targets")
    return torch.from_numpy(np.concatenate([labels[:, :1], targets], axis=1))  # [b, L]
