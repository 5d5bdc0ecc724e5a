"""Typed configuration of the model and its parallel layout, with the one validation step.

Every check that can fail before compute lives in `validate_model()`, and each error names
the field and the fix. `SequenceGeometry` resolves the sequence lengths the model actually
runs with, including the alignment that sequence parallelism and FP8 need: the ViT sequence
is padded with extra register tokens and the decoder's kept-token count is rounded up, never
down, so no data is silently dropped. `geometry.notes` says what was changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ov2_megatron.variants import TransformerShape, decoder_shape, vit_shape

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8", "nvfp4")
# Blackwell-only block-scaled formats: Hopper (sm90) tensor cores have no MX/NVFP4 support.
BLACKWELL_ONLY_FP8 = ("mxfp8", "nvfp4")


@dataclass
class VisionConfig:
    variant: str = "L/14"
    """ViT size and patch, a key of variants.py ("L/14", "g/14", ...)."""
    image_size: int = 224
    """Square input side in pixels (84 in stage 1, 224+ in stage 2)."""
    width: int | None = None
    """Override the variant's width (tiny test and CPU recipes); None keeps the variant's."""
    depth: int | None = None
    """Override the variant's depth."""
    mlp_dim: int | None = None
    """Override the variant's MLP width."""
    num_heads: int | None = None
    """Override the variant's head count."""
    patch_size: int | None = None
    """Override the variant's patch size."""
    in_channels: int = 3
    """Image channels."""
    class_token: bool = True
    """Prepend a learned CLS token (the reference does; its output is the pooled feature)."""
    num_registers: int = 0
    """Learned register tokens after CLS (more may be added to align the sequence)."""
    pos_embed: str = "sincos"
    """'sincos' (fixed 2-D table, re-generated at any resolution) or 'learned' (interpolated)."""
    keep_ratio: float = 0.35
    """Fraction of patch tokens the decoder sees (released OpenVision 2 script: 0.35)."""

    def shape(self) -> tuple[TransformerShape, int]:
        base, patch = vit_shape(self.variant)
        return TransformerShape(self.width or base.width, self.depth or base.depth,
                                self.mlp_dim or base.mlp_dim,
                                self.num_heads or base.num_heads), self.patch_size or patch


@dataclass
class DecoderConfig:
    variant: str = "L"
    """Caption decoder size, a key of variants.py DECODER_SHAPES."""
    width: int | None = None
    """Override the variant's width."""
    depth: int | None = None
    """Override the variant's depth."""
    mlp_dim: int | None = None
    """Override the variant's MLP width."""
    num_heads: int | None = None
    """Override the variant's head count."""
    vocab_size: int = 32000
    """Tokenizer vocabulary; the embedding and head are padded to vocab_pad_multiple."""
    vocab_pad_multiple: int = 1024
    """Pad the vocabulary to a multiple of this (128 rows per shard up to TP=8). Megatron pads
    to 128 x TP, which changes the tensor shapes with TP and so breaks moving checkpoints
    between TP sizes; a fixed multiple keeps them portable. Must be divisible by TP."""
    caption_length: int = 128
    """Tokens per caption incl. BOS/EOS; the decoder reads caption_length - 1 of them."""
    pad_id: int = 0
    """Padding token id: labels equal to it carry no loss."""
    mask: str = "causal"
    """'causal' over [image; text] (the reference code) or 'prefix' (image tokens see each other)."""
    pos_embed: str = "none"
    """'none' (the reference: order comes from the causal mask) or 'learned'."""
    loss_weight: float = 2.0
    """Scale of the caption cross-entropy (reference: 2.0)."""

    def shape(self) -> TransformerShape:
        base = decoder_shape(self.variant)
        return TransformerShape(self.width or base.width, self.depth or base.depth,
                                self.mlp_dim or base.mlp_dim, self.num_heads or base.num_heads)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    layernorm_eps: float = 1e-6
    """LayerNorm epsilon (big_vision / timm ViT default)."""
    init_std: float = 0.02
    """Std of the normal initialiser of linear and embedding weights."""
    transformer_impl: str = "auto"
    """'local' (megatron's own layers: CPU and plain GPU), 'transformer_engine' (GPU, needed
    for FP8), or 'auto' (TE when it imports and CUDA is present, else local)."""
    fp8: str | None = None
    """FP8 recipe via Transformer Engine: one of FP8_RECIPES, or None for bf16/fp32."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence over the TP group."""


@dataclass(frozen=True)
class SequenceGeometry:
    """The sequence lengths the model runs with, after alignment."""

    num_patches: int
    num_registers: int  # configured + alignment padding
    vit_prefix: int  # CLS + registers, removed before token dropping
    vit_seq: int
    num_kept: int  # patch tokens the decoder sees
    text_len: int  # caption_length - 1
    decoder_seq: int  # num_kept + text_len
    padded_vocab: int
    notes: tuple[str, ...]


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round up to a multiple of `multiple` (even, aligned shards on every TP rank)."""
    return -(-vocab_size // multiple) * multiple


def sequence_alignment(model: ModelConfig, parallel: ParallelConfig) -> int:
    align = parallel.tensor if parallel.sequence_parallel else 1
    if model.fp8:
        align = math.lcm(align, 16)  # FP8 GEMMs need token counts that are multiples of 16
    return align


def geometry(model: ModelConfig, parallel: ParallelConfig) -> SequenceGeometry:
    vision, decoder = model.vision, model.decoder
    _, patch = vision.shape()
    num_patches = (vision.image_size // patch) ** 2
    align = sequence_alignment(model, parallel)
    notes = []
    registers = vision.num_registers
    prefix = int(vision.class_token) + registers
    pad = -(prefix + num_patches) % align
    if pad:
        registers += pad
        notes.append(f"{pad} register tokens added so the ViT sequence "
                     f"({prefix + num_patches} -> {prefix + num_patches + pad}) divides by {align}")
    prefix = int(vision.class_token) + registers
    kept = max(1, int(num_patches * vision.keep_ratio))
    text_len = decoder.caption_length - 1
    extra = -(kept + text_len) % align
    if extra:
        if kept + extra > num_patches:
            raise ValueError(
                f"vision.keep_ratio {vision.keep_ratio}: the decoder sequence cannot be aligned "
                f"to {align} by keeping more of the {num_patches} patches; change "
                f"decoder.caption_length ({decoder.caption_length}) or the keep ratio")
        notes.append(f"kept tokens rounded up {kept} -> {kept + extra} so the decoder "
                     f"sequence ({kept + text_len}) divides by {align}")
        kept += extra
    return SequenceGeometry(num_patches, registers, prefix, prefix + num_patches, kept,
                            text_len, kept + text_len,
                            padded_vocab_size(decoder.vocab_size, decoder.vocab_pad_multiple),
                            tuple(notes))


def validate_model(model: ModelConfig, parallel: ParallelConfig,
                   device_capability: tuple[int, int] | None = None) -> SequenceGeometry:
    """The one validation step; returns the resolved geometry. Raises ValueError on bad input."""
    vision, decoder = model.vision, model.decoder
    vit, patch = vision.shape()
    dec = decoder.shape()
    tp = parallel.tensor
    _check(vision.image_size % patch == 0,
           f"vision.image_size {vision.image_size} is not a multiple of the patch size {patch}")
    _check(0 < vision.keep_ratio <= 1,
           f"vision.keep_ratio {vision.keep_ratio} must be in (0, 1]")
    _check(vision.pos_embed in ("sincos", "learned"),
           f"vision.pos_embed {vision.pos_embed!r}: use 'sincos' or 'learned'")
    _check(vision.pos_embed != "sincos" or vit.width % 4 == 0,
           f"vision width {vit.width} must be a multiple of 4 for the sin-cos position table")
    _check(decoder.mask in ("causal", "prefix"),
           f"decoder.mask {decoder.mask!r}: use 'causal' or 'prefix'")
    _check(decoder.pos_embed in ("none", "learned"),
           f"decoder.pos_embed {decoder.pos_embed!r}: use 'none' or 'learned'")
    _check(decoder.caption_length >= 2,
           f"decoder.caption_length {decoder.caption_length} must be at least 2 (BOS + EOS)")
    _check(0 <= decoder.pad_id < decoder.vocab_size,
           f"decoder.pad_id {decoder.pad_id} outside the vocabulary [0, {decoder.vocab_size})")
    for name, shape in (("vision", vit), ("decoder", dec)):
        _check(shape.width % shape.num_heads == 0,
               f"{name} width {shape.width} is not divisible by its {shape.num_heads} heads")
        _check(shape.num_heads % tp == 0,
               f"{name} heads {shape.num_heads} not divisible by tensor-parallel size {tp}: "
               f"choose a TP size that divides {shape.num_heads}")
        _check(shape.mlp_dim % tp == 0,
               f"{name} MLP width {shape.mlp_dim} not divisible by tensor-parallel size {tp}")
    _check(decoder.vocab_pad_multiple % tp == 0,
           f"decoder.vocab_pad_multiple {decoder.vocab_pad_multiple} is not divisible by "
           f"tensor-parallel size {tp}: use a multiple of {tp}")
    _check(parallel.pipeline >= 1 and tp >= 1, "parallel sizes must be >= 1")
    _check(parallel.virtual_pipeline is None or parallel.pipeline > 1,
           "parallel.virtual_pipeline needs parallel.pipeline > 1")
    _check(not parallel.sequence_parallel or tp > 1,
           "parallel.sequence_parallel needs tensor parallelism (parallel.tensor > 1)")
    _check(model.transformer_impl in ("auto", "local", "transformer_engine"),
           f"transformer_impl {model.transformer_impl!r}: use auto, local or transformer_engine")
    if model.fp8:
        _validate_fp8(model, vit, dec, tp, device_capability)
    return geometry(model, parallel)


def _validate_fp8(model, vit, dec, tp, device_capability) -> None:
    _check(model.fp8 in FP8_RECIPES, f"fp8 {model.fp8!r}: use one of {FP8_RECIPES} or None")
    _check(model.transformer_impl != "local",
           "fp8 needs transformer_impl 'transformer_engine' (or 'auto' on a GPU with TE)")
    _check(device_capability is not None,
           "fp8 needs a CUDA GPU with Transformer Engine; unset fp8 to run on CPU")
    if model.fp8 in BLACKWELL_ONLY_FP8:
        _check(device_capability >= (10, 0),
               f"fp8 {model.fp8!r} uses block-scaled MX/NVFP4 formats that only Blackwell "
               f"(sm100+) tensor cores execute; this GPU is sm{device_capability[0]}"
               f"{device_capability[1]} (Hopper has none): use 'delayed', 'tensorwise' or "
               "'blockwise'")
    else:
        _check(device_capability >= (8, 9),
               f"fp8 needs Ada/Hopper or newer (sm89+); this GPU is sm{device_capability[0]}"
               f"{device_capability[1]}")
    for name, shape in (("vision", vit), ("decoder", dec)):
        for what, size in (("width", shape.width), ("MLP width", shape.mlp_dim)):
            _check((size // tp) % 16 == 0,
                   f"fp8: {name} {what} {size} / TP {tp} must be a multiple of 16 for FP8 GEMMs")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
