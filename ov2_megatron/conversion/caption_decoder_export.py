"""The caption decoder on its own: `decoder_config.json` + `decoder.safetensors`, loaded into a
plain-PyTorch module (no megatron, no process group) that captions encode()'s patch tokens.

    python tools/convert_checkpoint.py export-decoder --checkpoint RUN --output DIR
    decoder = caption_decoder_export.load(DIR)           # StandaloneDecoder, eval mode
    logits = decoder.text_logits(patch_tokens, text)     # [b, t, vocab]

The module computes what the megatron decoder (models/caption_decoder.py + the local-spec
layers) computes: image tokens [b, k, w_enc] -> img_proj (no bias) -> [image; tok_embed(text)]
(+ learned positions if the run had them) -> pre-LN blocks (fused qkv rows [q; k; v],
softmax(q k^T / sqrt(hd)) under the causal or prefix mask, GELU as decoder.gelu_approximate)
-> final LayerNorm -> head (no bias) at the text positions. Trailing positions never change
earlier ones under either mask, so a text prefix shorter than the training length gives the
same logits as the fixed-length, PAD-filled sequence megatron runs. Tensor names are the
standard ones (models/state_dict_adapter.py) with the `decoder.` prefix dropped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.atomic_output import staged_directory

CONFIG_FILE, WEIGHTS_FILE = "decoder_config.json", "decoder.safetensors"
FORMAT = "ov2_megatron.caption_decoder/1"


@dataclass(frozen=True)
class DecoderSpec:
    """What decoder_config.json holds: the shape, the token ids and the run's choices."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    encoder_width: int
    """Width of the patch tokens it reads (the ViT's)."""
    vocab_size: int
    caption_length: int
    """Token slots of a caption (BOS ... EOS PAD...); generation fills slots 1 .. L-2."""
    pad_id: int
    bos_id: int
    eos_id: int
    mask: str
    """'causal' or 'prefix' (image tokens see each other both ways)."""
    pos_embed: str
    """'none' or 'learned' (then exactly `num_image_tokens` image tokens are expected)."""
    num_image_tokens: int
    """Image tokens per caption in training (the kept patches)."""
    gelu_approximate: str
    layernorm_eps: float
    format: str = FORMAT


def spec_from_run(run, geom) -> DecoderSpec:
    from ov2_megatron.data.tokenizer import BOS_ID, EOS_ID

    decoder, dec = run.model.decoder, run.model.decoder.shape()
    return DecoderSpec(
        width=dec.width, depth=dec.depth, mlp_dim=dec.mlp_dim, num_heads=dec.num_heads,
        encoder_width=run.model.vision.shape()[0].width, vocab_size=decoder.vocab_size,
        caption_length=decoder.caption_length, pad_id=decoder.pad_id, bos_id=BOS_ID,
        eos_id=EOS_ID, mask=decoder.mask, pos_embed=decoder.pos_embed,
        num_image_tokens=geom.num_kept, gelu_approximate=decoder.gelu_approximate,
        layernorm_eps=run.model.layernorm_eps)


class _Block(nn.Module):
    """Pre-LN: x + proj(attention(LN1(x))), then x + fc2(gelu(fc1(LN2(x))))."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        w = spec.width
        self.num_heads, self.approximate = spec.num_heads, spec.gelu_approximate
        self.ln1 = nn.LayerNorm(w, eps=spec.layernorm_eps)
        self.ln2 = nn.LayerNorm(w, eps=spec.layernorm_eps)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(w, 3 * w), proj=nn.Linear(w, w)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(w, spec.mlp_dim),
                                      fc2=nn.Linear(spec.mlp_dim, w)))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        hd = w // self.num_heads
        qkv = self.attn["qkv"](self.ln1(x)).view(b, s, 3, self.num_heads, hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [b, heads, s, hd]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [b, heads, s, s]
        # -inf is safe: every row allows at least its own (diagonal) position
        attended = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        x = x + self.attn["proj"](attended.transpose(1, 2).reshape(b, s, w))  # [b, s, w]
        hidden = nn.functional.gelu(self.mlp["fc1"](self.ln2(x)), approximate=self.approximate)
        return x + self.mlp["fc2"](hidden)


class StandaloneDecoder(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.img_proj = nn.Linear(spec.encoder_width, spec.width, bias=False)
        self.tok_embed = nn.Embedding(spec.vocab_size, spec.width)
        self.pos_embed = None
        if spec.pos_embed == "learned":  # image tokens + the caption_length - 1 text inputs
            self.pos_embed = nn.Parameter(torch.zeros(
                spec.num_image_tokens + spec.caption_length - 1, spec.width))
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width, eps=spec.layernorm_eps)
        self.head = nn.Linear(spec.width, spec.vocab_size, bias=False)

    def text_logits(self, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image_tokens [b, k, w_enc] (raw patch tokens, as encode() returns them), text [b, t]
        (BOS first) -> logits [b, t, vocab]: row i predicts text slot i + 1."""
        k = image_tokens.shape[1]
        if self.pos_embed is not None and k != self.spec.num_image_tokens:
            raise ValueError(f"{k} image tokens: this decoder's learned positions were trained "
                             f"with {self.spec.num_image_tokens}; keep that many patches")
        x = torch.cat([self.img_proj(image_tokens), self.tok_embed(text)], dim=1)  # [b, k+t, d]
        if self.pos_embed is not None:
            x = x + self.pos_embed[:x.shape[1]]
        s = x.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if self.spec.mask == "prefix":
            allowed[:k, :k] = True
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.norm(x[:, k:]))  # [b, t, vocab]


def decoder_tensors(standard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `decoder.*` tensors of a standard state dict, prefix dropped, fp32."""
    return {name[len("decoder."):]: t.float().contiguous() for name, t in standard.items()
            if name.startswith("decoder.")}


def build(spec: DecoderSpec, tensors: dict[str, torch.Tensor], source: str) -> StandaloneDecoder:
    decoder = StandaloneDecoder(spec)
    expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    problems = [f"missing tensor {n}" for n in expected if n not in tensors]
    problems += [f"unexpected tensor {n}" for n in tensors if n not in expected]
    problems += [f"{n} has shape {tuple(tensors[n].shape)}, the config needs {s}"
                 for n, s in expected.items() if n in tensors and tuple(tensors[n].shape) != s]
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems[:8]))
    decoder.load_state_dict(tensors, strict=True)
    return decoder.eval()


def from_standard(standard: dict[str, torch.Tensor], run, geom) -> StandaloneDecoder:
    return build(spec_from_run(run, geom), decoder_tensors(standard), "standard state dict")


def export(standard: dict[str, torch.Tensor], run, geom, output: str) -> DecoderSpec:
    from safetensors.torch import save_file

    spec = spec_from_run(run, geom)
    tensors = decoder_tensors(standard)
    build(spec, tensors, "standard state dict")  # refuses before anything is written
    with staged_directory(output) as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(asdict(spec), f, indent=2)
    return spec


def load(directory: str) -> StandaloneDecoder:
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(config_path) as f:
            fields = json.load(f)
        spec = DecoderSpec(**fields)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ConversionError(f"{config_path}: not a caption decoder config ({error})") from None
    if spec.format != FORMAT:
        raise ConversionError(f"{config_path}: format {spec.format!r}, this version reads "
                              f"{FORMAT!r}")
    weights = os.path.join(directory, WEIGHTS_FILE)
    try:
        tensors = load_file(weights)
    except Exception as error:
        raise ConversionError(f"{weights}: cannot read ({type(error).__name__}: {error})") \
            from None
    return build(spec, tensors, weights)
