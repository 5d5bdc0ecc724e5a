"""Independent pure-PyTorch reference of OpenVision 2 (ViT encoder + caption decoder).

This file is the twin the megatron-core model is proven equal to (loss and every gradient
within fp32 tolerance). It imports nothing from ov2_megatron or megatron, and it computes
attention, GELU and the loss explicitly, so that a shared bug cannot hide in a shared kernel.
A twin written here only proves consistency; it is itself held to the case computed by the
official OpenVision 2 code (tests/reference/test_official_fixture.py), so that a misreading
shared by both cannot hide either.

As the official model: the decoder reads the raw output of the last ViT block (no LayerNorm);
the ViT's final LayerNorm `vision.norm` acts only on the pooled feature LN(mean of patches);
exact (erf) GELU in the ViT MLP, tanh-approximated GELU in the decoder MLP.

Construction: `OpenVision2Reference(VisionConfig(...), DecoderConfig(...))`; plain dicts with
the same field names are accepted too.

Parameter layout (state_dict keys; `{i}` is the block index, shapes are torch's own):
    vision.patch_embed.weight          [width, C, p, p]       Conv2d, no bias
    vision.pos_embed                   [N, width]             only if pos_embed == "learned"
    vision.cls_token                   [width]                only if class_token
    vision.registers                   [R, width]             only if num_registers > 0
    vision.blocks.{i}.ln1.weight/bias  [width]
    vision.blocks.{i}.attn.qkv.weight  [3*width, width]       rows [q all heads; k; v]
    vision.blocks.{i}.attn.qkv.bias    [3*width]
    vision.blocks.{i}.attn.proj.weight/bias  [width, width] / [width]
    vision.blocks.{i}.ln2.weight/bias  [width]
    vision.blocks.{i}.mlp.fc1.weight/bias    [mlp_dim, width] / [mlp_dim]
    vision.blocks.{i}.mlp.fc2.weight/bias    [width, mlp_dim] / [width]
    vision.norm.weight/bias            [width]                on the pooled feature only
    decoder.img_proj.weight            [D, width]             no bias
    decoder.tok_embed.weight           [V, D]
    decoder.pos_embed                  [N + max_text_len - 1, D]  only if dec_pos_embed == "learned"
    decoder.blocks.{i}.*               same names as the vision blocks, with D / dec_mlp_dim
    decoder.norm.weight/bias           [D]
    decoder.head.weight                [V, D]                 no bias
The fixed sin-cos table is recomputed in forward (no buffer), so it never appears in state_dict.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn


@dataclass
class VisionConfig:
    image_size: int  # square input side in pixels
    patch_size: int  # conv kernel == stride; image_size must be a multiple
    width: int  # token width
    depth: int  # number of transformer blocks
    mlp_dim: int  # hidden width of each MLP
    num_heads: int  # width must be divisible by it
    in_channels: int = 3
    class_token: bool = True  # if False, pooled output is the mean of patch tokens
    num_registers: int = 0  # extra learned tokens after CLS, dropped from the outputs
    pos_embed: str = "sincos"  # "sincos" (fixed big_vision 2-D table) or "learned"
    layernorm_eps: float = 1e-6
    gelu_approximate: str = "none"  # "none": exact erf GELU (the official ViT); or "tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed {self.pos_embed!r} must be 'sincos' or 'learned'")
        if self.pos_embed == "sincos" and (self.width % 4 or self.width < 8):
            raise ValueError(f"width {self.width} must be a multiple of 4 and >= 8 for sincos pos_embed")


@dataclass
class DecoderConfig:
    dec_width: int  # D
    dec_depth: int
    dec_mlp_dim: int
    dec_num_heads: int
    vocab_size: int  # V
    pad_id: int  # labels equal to it carry no loss
    mask: str = "causal"  # "causal" over [image; text] (the OpenVision 2 code) or "prefix"
    loss_weight: float = 2.0  # OpenVision 2 scales the caption loss by 2
    dec_pos_embed: str = "none"  # "none" or "learned" (over the whole [image; text] sequence)
    max_text_len: int = 0  # longest token sequence L (BOS..EOS PAD); sizes learned positions
    layernorm_eps: float = 1e-6
    gelu_approximate: str = "tanh"  # "tanh": the official decoder (flax nn.gelu default)

    def validate(self) -> None:
        if self.dec_width % self.dec_num_heads:
            raise ValueError(f"dec_width {self.dec_width} not divisible by dec_num_heads {self.dec_num_heads}")
        if self.mask not in ("causal", "prefix"):
            raise ValueError(f"mask {self.mask!r} must be 'causal' or 'prefix'")
        if self.dec_pos_embed not in ("none", "learned"):
            raise ValueError(f"dec_pos_embed {self.dec_pos_embed!r} must be 'none' or 'learned'")
        if self.dec_pos_embed == "learned" and self.max_text_len < 2:
            raise ValueError("dec_pos_embed 'learned' needs max_text_len >= 2")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} outside [0, vocab_size {self.vocab_size})")


def _as_config(cls, value):
    if isinstance(value, cls):
        return value
    names = {f.name for f in fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**value)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def posemb_sincos_2d(grid: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """big_vision posemb_sincos_2d (temperature 10000) -> [grid*grid, width]."""
    # computed in float64 and cast once, so fp32 and fp64 models share the same table
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    quarter = width // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1))  # [w/4]
    x = x.flatten()[:, None] * omega  # [N, w/4]
    y = y.flatten()[:, None] * omega  # [N, w/4]
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # [N, w]
    return table.to(dtype=dtype, device=device)


def random_keep_indices(batch: int, num_patches: int, keep_ratio: float, generator=None) -> torch.Tensor:
    """Per example, the first K = int(N * keep_ratio) entries of a randperm -> [B, K] (unsorted)."""
    keep = int(num_patches * keep_ratio)
    rows = [torch.randperm(num_patches, generator=generator)[:keep] for _ in range(batch)]
    return torch.stack(rows)  # [B, K]


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        b, s, w = x.shape
        hd = w // self.num_heads
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, hd)  # [b, s, 3, heads, hd]
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each [b, heads, s, hd]
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [b, heads, s, s]
        if allowed is not None:
            # -inf is safe: every row allows at least its own (diagonal) position
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # [b, heads, s, hd]
        return self.proj(out.transpose(1, 2).reshape(b, s, w))  # [b, s, w]


def gelu(h: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU written out: exact (erf) or the tanh approximation."""
    if approximate == "tanh":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if approximate == "none":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    raise ValueError(f"gelu approximate {approximate!r} must be 'none' or 'tanh'")


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, approximate: str):
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(width, mlp_dim, bias=True)
        self.fc2 = nn.Linear(mlp_dim, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x), self.approximate))


class Block(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, eps: float, approximate: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, approximate)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


def _init_weights(module: nn.Module) -> None:
    """normal(0.02) weights and extra tokens, zero biases, unit LayerNorm scales."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=0.02)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig | dict, device=None):
        super().__init__()
        cfg = _as_config(VisionConfig, cfg)
        cfg.validate()
        self.cfg = cfg
        w, n = cfg.width, cfg.num_patches
        # building under torch.device("meta") makes ViT-g parameter counts free
        with torch.device(device) if device is not None else nullcontext():
            self.patch_embed = nn.Conv2d(cfg.in_channels, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
            self.pos_embed = nn.Parameter(torch.empty(n, w)) if cfg.pos_embed == "learned" else None
            self.cls_token = nn.Parameter(torch.empty(w)) if cfg.class_token else None
            self.registers = nn.Parameter(torch.empty(cfg.num_registers, w)) if cfg.num_registers else None
            self.blocks = nn.ModuleList(
                Block(w, cfg.mlp_dim, cfg.num_heads, cfg.layernorm_eps, cfg.gelu_approximate)
                for _ in range(cfg.depth)
            )
            self.norm = nn.LayerNorm(w, eps=cfg.layernorm_eps)
        _init_weights(self)

    @property
    def num_prefix(self) -> int:
        """CLS + registers: tokens before the patches that carry no position embedding."""
        return int(self.cfg.class_token) + self.cfg.num_registers

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> patch tokens with positions [B, N, width], row-major."""
        size = self.cfg.image_size
        if images.dim() != 4 or images.shape[-2:] != (size, size):
            raise ValueError(f"images shape {tuple(images.shape)} must be [B, C, {size}, {size}] (image_size)")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, width, gh, gw] -> [B, N, width]
        if self.pos_embed is not None:
            return x + self.pos_embed
        grid = size // self.cfg.patch_size
        return x + posemb_sincos_2d(grid, self.cfg.width, dtype=x.dtype, device=x.device)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (patch_tokens [B, N, width], the raw output of the last block; pooled [B, width]
        = LN(mean of the patch tokens)), as the official ViT with pool_type 'gap'."""
        x = self.embed(images)  # [B, N, w]
        b = x.shape[0]
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, 1, -1))  # [B, 1, w]
        if self.registers is not None:
            prefix.append(self.registers.expand(b, -1, -1))  # [B, R, w]
        x = torch.cat(prefix + [x], dim=1)  # [B, P + N, w]
        for block in self.blocks:
            x = block(x)
        patches = x[:, self.num_prefix :]  # [B, N, w]
        return patches, self.norm(patches.mean(dim=1))

    forward = encode


def attention_mask(num_image: int, num_text: int, kind: str, device=None) -> torch.Tensor:
    """Boolean [S, S] (True = may attend), S = num_image + num_text, query rows, key columns."""
    s = num_image + num_text
    allowed = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    if kind == "prefix":
        # image tokens see each other both ways; text already sees all image tokens via tril
        allowed[:num_image, :num_image] = True
    return allowed


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig | dict, image_width: int, max_image_tokens: int, device=None):
        super().__init__()
        cfg = _as_config(DecoderConfig, cfg)
        cfg.validate()
        self.cfg = cfg
        d = cfg.dec_width
        with torch.device(device) if device is not None else nullcontext():
            self.img_proj = nn.Linear(image_width, d, bias=False)
            self.tok_embed = nn.Embedding(cfg.vocab_size, d)
            # text input is tokens[:, :-1], so the longest sequence is N + max_text_len - 1
            n_pos = max_image_tokens + cfg.max_text_len - 1
            self.pos_embed = nn.Parameter(torch.empty(n_pos, d)) if cfg.dec_pos_embed == "learned" else None
            self.blocks = nn.ModuleList(
                Block(d, cfg.dec_mlp_dim, cfg.dec_num_heads, cfg.layernorm_eps, cfg.gelu_approximate)
                for _ in range(cfg.dec_depth)
            )
            self.norm = nn.LayerNorm(d, eps=cfg.layernorm_eps)
            self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        _init_weights(self)

    def hidden(self, img: torch.Tensor, text_input: torch.Tensor) -> torch.Tensor:
        """img [B, K, D] (already projected), text_input [B, T] -> final-norm states [B, K+T, D]."""
        v = self.cfg.vocab_size
        if text_input.numel() and (text_input.min() < 0 or text_input.max() >= v):
            raise ValueError(f"token ids must lie in [0, vocab_size {v})")
        x = torch.cat([img, self.tok_embed(text_input)], dim=1)  # [B, K+T, D]
        if self.pos_embed is not None:
            if x.shape[1] > self.pos_embed.shape[0]:
                raise ValueError(f"sequence {x.shape[1]} longer than learned positions {self.pos_embed.shape[0]}")
            x = x + self.pos_embed[: x.shape[1]]
        allowed = attention_mask(img.shape[1], text_input.shape[1], self.cfg.mask, device=x.device)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def text_logits(self, img: torch.Tensor, text_input: torch.Tensor) -> torch.Tensor:
        """-> logits [B, T, V] at text positions only."""
        return self.head(self.hidden(img, text_input)[:, img.shape[1] :])


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> dict:
    """Mean cross-entropy over all non-PAD labels of the batch (not a mean of per-row means)."""
    valid = labels != pad_id  # [B, T]
    logp = logits.log_softmax(dim=-1)  # [B, T, V]
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    num_tokens = valid.sum()
    # clamp: a batch of only PAD gives loss 0 instead of NaN
    ce = (nll * valid).sum() / num_tokens.clamp(min=1)
    correct = (logits.argmax(dim=-1) == labels) & valid
    accuracy = correct.sum().to(logits.dtype) / num_tokens.clamp(min=1)
    return {"caption_loss": ce, "num_tokens": num_tokens, "token_accuracy": accuracy.detach()}


class OpenVision2Reference(nn.Module):
    """ViT encoder -> token drop -> linear projection -> caption decoder -> weighted CE."""

    def __init__(self, vision: VisionConfig | dict, decoder: DecoderConfig | dict, device=None):
        super().__init__()
        self.vision = VisionEncoder(vision, device=device)
        vcfg = self.vision.cfg
        self.decoder = CaptionDecoder(decoder, vcfg.width, vcfg.num_patches, device=device)

    def kept_tokens(self, images: torch.Tensor, keep_idx: torch.Tensor | None) -> torch.Tensor:
        """Encode, keep patches keep_idx [B, K] in the given order, project -> [B, K, D]."""
        patches, _ = self.vision.encode(images)  # [B, N, w]
        if keep_idx is not None:
            n = patches.shape[1]
            if keep_idx.dim() != 2 or keep_idx.shape[0] != patches.shape[0]:
                raise ValueError(f"keep_idx shape {tuple(keep_idx.shape)} must be [B, K]")
            if keep_idx.numel() and (keep_idx.min() < 0 or keep_idx.max() >= n):
                raise ValueError(f"keep_idx must lie in [0, num_patches {n})")
            index = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # [B, K, w]
            patches = patches.gather(1, index)  # [B, K, w]
        return self.decoder.img_proj(patches)  # [B, K, D]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, keep_idx: torch.Tensor | None = None) -> dict:
        """images [B, C, H, W], tokens [B, L] (BOS .. EOS PAD ..) -> dict of loss terms and logits."""
        img = self.kept_tokens(images, keep_idx)  # [B, K, D]
        text_input, labels = tokens[:, :-1], tokens[:, 1:]  # [B, L-1] each
        logits = self.decoder.text_logits(img, text_input)  # [B, L-1, V]
        out = caption_loss(logits, labels, self.decoder.cfg.pad_id)
        out["loss"] = self.decoder.cfg.loss_weight * out["caption_loss"]
        out["logits"] = logits
        return out

    @torch.no_grad()
    def generate(self, images, keep_idx, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """Greedy captions [B, <= max_len] starting with BOS; rows that emitted EOS pad after it.

        Plain argmax over the whole vocabulary, recomputing the full sequence every step.
        """
        img = self.kept_tokens(images, keep_idx)  # [B, K, D]
        b = img.shape[0]
        seq = torch.full((b, 1), bos_id, dtype=torch.long, device=img.device)  # [B, 1]
        done = torch.zeros(b, dtype=torch.bool, device=img.device)
        while seq.shape[1] < max_len and not bool(done.all()):
            nxt = self.decoder.text_logits(img, seq)[:, -1].argmax(dim=-1)  # [B]
            nxt = torch.where(done, torch.full_like(nxt, self.decoder.cfg.pad_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)  # [B, t+1]
            done |= nxt == eos_id
        return seq
