"""Names and layouts: megatron chunks <-> one plain "standard" state dict.

Standard layout (the one the pure-PyTorch reference in tests/ uses and the timm / Hugging Face
exporters start from): `vision.blocks.{i}.attn.qkv.weight` is [3w, w] with rows [q; k; v],
LayerNorms are `ln1`/`ln2`, the MLP is `fc1`/`fc2`, `vision.norm` is the LayerNorm of the
pooled feature (official `encoder_norm`), the vocabulary is unpadded.

Megatron differences handled here: fused QKV rows interleaved per head ([heads, (q,k,v), d]),
layer indices local to a pipeline chunk, and vocabulary rows padded for TP.

Local vs TE spec: the same tensors, with two differences of name. The TE spec fuses each
pre-norm into the linear after it (`other_spec_name` maps between the two), and TE modules
keep FP8 metadata as `<module>._extra_state` entries (`is_extra_state`), which no local
checkpoint has and which hold no weights.
"""

from __future__ import annotations

import re

import torch

from ov2_megatron.parallel.pipeline_split import StagePlan

_LAYER = re.compile(r"^(vision_layers|decoder_layers)\.layers\.(\d+)\.(.*)$")

_LAYER_PARTS = {
    "input_layernorm.weight": "ln1.weight", "input_layernorm.bias": "ln1.bias",
    "self_attention.linear_qkv.weight": "attn.qkv.weight",
    "self_attention.linear_qkv.bias": "attn.qkv.bias",
    "self_attention.linear_proj.weight": "attn.proj.weight",
    "self_attention.linear_proj.bias": "attn.proj.bias",
    "pre_mlp_layernorm.weight": "ln2.weight", "pre_mlp_layernorm.bias": "ln2.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight", "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight", "mlp.linear_fc2.bias": "mlp.fc2.bias",
    # The TE spec fuses each pre-norm into the linear after it (TE's LayerNormLinear registers
    # them as `layer_norm_weight` / `layer_norm_bias`): the same tensors as the local norms.
    "self_attention.linear_qkv.layer_norm_weight": "ln1.weight",
    "self_attention.linear_qkv.layer_norm_bias": "ln1.bias",
    "mlp.linear_fc1.layer_norm_weight": "ln2.weight",
    "mlp.linear_fc1.layer_norm_bias": "ln2.bias",
}
_OTHER = {
    "embedding.patch_embed.weight": "vision.patch_embed.weight",
    "embedding.cls_token": "vision.cls_token",
    "embedding.registers": "vision.registers",
    "embedding.pos_embed": "vision.pos_embed",
    "pooled_norm.weight": "vision.norm.weight",  # on the pooled feature only
    "pooled_norm.bias": "vision.norm.bias",
    "caption_input.projection.weight": "decoder.img_proj.weight",
    "caption_input.token_embedding.weight": "decoder.tok_embed.weight",
    "caption_input.pos_embed": "decoder.pos_embed",
    "decoder_layers.final_layernorm.weight": "decoder.norm.weight",
    "decoder_layers.final_layernorm.bias": "decoder.norm.bias",
    "head.head.weight": "decoder.head.weight",
}
VOCAB_ROWS = ("decoder.tok_embed.weight", "decoder.head.weight")

# Layer parts that are one tensor under the local and the TE name (the fused pre-norms).
_OTHER_SPEC_PART = {part: other for part in _LAYER_PARTS for other in _LAYER_PARTS
                    if part != other and _LAYER_PARTS[part] == _LAYER_PARTS[other]}
# torch's suffix for get_extra_state(): TE's TransformerEngineBaseModule (Linear,
# LayerNormLinear, DotProductAttention) and its LayerNorm op serialise FP8 scales and amax
# history there; megatron's local linears write None under the same names.
EXTRA_STATE = "_extra_state"


def is_extra_state(name: str) -> bool:
    """A module's extra-state entry (state dict or dist_checkpointing key), not a weight."""
    return name.rsplit(".", 1)[-1] == EXTRA_STATE


def other_spec_name(chunk_name: str) -> str | None:
    """The name the other spec gives the same tensor (`...input_layernorm.weight` <->
    `...self_attention.linear_qkv.layer_norm_weight`), or None where both specs agree."""
    match = _LAYER.match(chunk_name)
    if not match or match.group(3) not in _OTHER_SPEC_PART:
        return None
    stack, local, part = match.groups()
    return f"{stack}.layers.{local}.{_OTHER_SPEC_PART[part]}"


def standard_name(chunk_name: str, plan: StagePlan) -> str:
    """A parameter name inside one chunk -> its standard (global) name."""
    match = _LAYER.match(chunk_name)
    if match:
        stack, local, part = match.groups()
        tower, start = (("vision", plan.vit_layers[0]) if stack == "vision_layers"
                        else ("decoder", plan.decoder_layers[0]))
        if part not in _LAYER_PARTS:
            raise KeyError(f"unexpected layer parameter {chunk_name!r}")
        return f"{tower}.blocks.{start + int(local)}.{_LAYER_PARTS[part]}"
    if chunk_name not in _OTHER:
        raise KeyError(f"unexpected parameter {chunk_name!r}")
    return _OTHER[chunk_name]


def qkv_to_standard(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron [heads * (q, k, v) * d, ...] -> [(q, k, v) * heads * d, ...]."""
    rest = tensor.shape[1:]
    per_head = tensor.reshape(heads, 3, -1, *rest)  # [heads, 3, d, ...]
    return per_head.transpose(0, 1).reshape(tensor.shape)


def qkv_from_standard(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    rest = tensor.shape[1:]
    grouped = tensor.reshape(3, heads, -1, *rest)  # [3, heads, d, ...]
    return grouped.transpose(0, 1).reshape(tensor.shape)


def copy_from_standard(param: torch.nn.Parameter, name: str, plan: StagePlan,
                       value: torch.Tensor, vit_heads: int, decoder_heads: int,
                       padded_vocab: int, tp: int, tp_rank: int) -> None:
    """Copy a full tensor in the standard layout into this TP rank's shard of the chunk
    parameter `name`. Raises ValueError if the shard does not fit."""
    std = standard_name(name, plan)
    full = from_standard({std: value}, [name], plan, vit_heads, decoder_heads, padded_vocab)[name]
    if getattr(param, "tensor_model_parallel", False):
        full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
    if full.shape != param.shape:
        raise ValueError(f"{std}: shard {tuple(full.shape)} does not fit "
                         f"{name} {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(full.to(param.dtype))


def to_standard(full_chunk_state: dict[str, torch.Tensor], plan: StagePlan, vit_heads: int,
                decoder_heads: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """One chunk's full (TP-gathered) parameters or gradients -> standard names and layouts."""
    out = {}
    for name, tensor in full_chunk_state.items():
        std = standard_name(name, plan)
        if std.endswith("attn.qkv.weight") or std.endswith("attn.qkv.bias"):
            tensor = qkv_to_standard(tensor, vit_heads if std.startswith("vision") else decoder_heads)
        if std in VOCAB_ROWS:
            tensor = tensor[:vocab_size]
        out[std] = tensor
    return out


def from_standard(standard: dict[str, torch.Tensor], chunk_names: list[str], plan: StagePlan,
                  vit_heads: int, decoder_heads: int,
                  padded_vocab: int) -> dict[str, torch.Tensor]:
    """Standard tensors -> full (unsharded) tensors for the named parameters of one chunk."""
    out = {}
    for name in chunk_names:
        std = standard_name(name, plan)
        if std not in standard:
            raise KeyError(f"{std!r} (for {name!r}) missing from the source state dict")
        tensor = standard[std]
        if std.endswith("attn.qkv.weight") or std.endswith("attn.qkv.bias"):
            tensor = qkv_from_standard(tensor, vit_heads if std.startswith("vision") else decoder_heads)
        if std in VOCAB_ROWS and tensor.shape[0] < padded_vocab:
            pad = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, pad])
        out[name] = tensor
    return out
