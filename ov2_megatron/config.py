"""Typed configuration of the model and its parallel layout, with the one validation step.

Every check that can fail before compute lives in `validate_model()`, and each error names
the field and the fix. `SequenceGeometry` resolves the sequence lengths the model actually
runs with, including the alignment that sequence parallelism and FP8 need. Alignment never
changes the function: both sequences get trailing padding positions that no real token
attends to (a key-padding mask in the ViT; in the decoder the causal mask already hides
later positions), whose outputs are dropped, and which hold no parameters. So the same
weights compute the same loss at every TP/SP/FP8 layout and checkpoints move between them.
`geometry.notes` says what was padded.
"""

from __future__ import annotations

import dataclasses
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
    """Prepend a learned CLS token, as the official ViT does (it takes part in attention; the
    pooled feature is LN(mean of the patch tokens), not its output)."""
    num_registers: int = 0
    """Learned register tokens after CLS (the official model has none)."""
    pos_embed: str = "sincos"
    """'sincos' (fixed 2-D table, re-generated at any resolution) or 'learned' (interpolated)."""
    keep_ratio: float = 0.35
    """Fraction of patch tokens the decoder sees (released OpenVision 2 script: 0.35)."""
    gelu_approximate: str = "none"
    """GELU of the ViT MLP, torch's `approximate` argument: 'none' is the exact (erf) GELU
    of the official ViT (flax `nn.gelu(approximate=False)`); 'tanh' the approximation."""

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
    """Token slots per caption, the official layout: BOS, pieces, EOS and PAD in the first
    caption_length - 1 slots (which the decoder reads), then one more PAD; so at most
    caption_length - 2 targets are supervised (126 at the official 128)."""
    pad_id: int = 0
    """Padding token id: labels equal to it carry no loss."""
    mask: str = "causal"
    """'causal' over [image; text] (the reference code) or 'prefix' (image tokens see each other)."""
    pos_embed: str = "none"
    """'none' (the reference: order comes from the causal mask) or 'learned'."""
    loss_weight: float = 2.0
    """Scale of the caption cross-entropy (reference: 2.0)."""
    gelu_approximate: str = "tanh"
    """GELU of the decoder MLP: 'tanh', as the official decoder (flax `nn.gelu`'s default
    approximation), or 'none' (exact erf)."""
    loss_kernel: str = "chunked"
    """How the head computes its loss: 'chunked' (kernels/linear_cross_entropy.py: the
    vocab-parallel linear + cross-entropy in token chunks, Triton on CUDA, never holding the
    [tokens, vocab] logits) or 'plain' (megatron's head, fp32 logits, vocab_parallel_cross_entropy).
    The same loss and gradients; the plain head's logits dominate memory at vocab 32k."""

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
    init: str = "official"
    """Initial weights: 'official', each parameter kind drawn as the official OpenVision 2
    code draws it (models/parameter_kinds.py: e.g. decoder q/k/v N(0, d^-1/2), ViT fc2 a
    truncated normal of std sqrt(0.3072/width), CLS N(0, 1e-6)), or 'megatron', one std
    (model.init_std) for every weight, fan-in scaled for the patch embedding, image projection
    and head."""
    init_std: float = 0.02
    """Std of the 'megatron' scheme (model.init); the official scheme does not read it."""
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
    """The sequence lengths the model runs with, after alignment padding."""

    num_patches: int
    num_registers: int  # as configured: alignment never adds parameters
    vit_prefix: int  # CLS + registers, removed before token dropping
    vit_tokens: int  # prefix + patches: the real ViT tokens
    vit_seq: int  # vit_tokens + trailing padding positions (masked out as keys)
    num_kept: int  # patch tokens the decoder sees in training
    text_len: int  # caption_length - 1
    decoder_tokens: int  # num_kept + text_len: the real decoder positions
    decoder_seq: int  # decoder_tokens + trailing padding positions (after the text)
    alignment: int  # both sequences are padded to a multiple of this
    padded_vocab: int
    notes: tuple[str, ...]

    def padding(self, tokens: int) -> int:
        """Trailing padding positions that align a sequence of `tokens` real positions."""
        return -tokens % self.alignment

    def padded(self, tokens: int) -> int:
        """Length of a sequence of `tokens` real positions after alignment padding."""
        return tokens + self.padding(tokens)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round up to a multiple of `multiple` (even, aligned shards on every TP rank)."""
    return -(-vocab_size // multiple) * multiple


# TE checks every FP8 GEMM input on each rank (assert_dim_for_fp8_exec, in
# transformer_engine/pytorch/utils.py): the product of all dimensions but the last must be a
# multiple of 8, the last a multiple of 16. A rank's column-parallel linears (linear_qkv,
# linear_fc1) get its [s / tp, b, h] shard under sequence parallelism (TE all-gathers it
# later), the row-parallel ones [s, b, h / tp]; so rows = (s / tp) * micro_batch, or s *
# micro_batch without SP. Padding each rank's share of the sequence to 16 rows makes that a
# multiple of 8 (and of 16, TE's own padding unit for FP8 GEMMs) for every micro-batch size.
FP8_TOKEN_ALIGNMENT = 16


def sequence_alignment(model: ModelConfig, parallel: ParallelConfig) -> int:
    """Both sequences are padded to a multiple of this: SP splits them into `tensor` equal
    shards, and under FP8 each shard holds a multiple of FP8_TOKEN_ALIGNMENT positions."""
    shards = parallel.tensor if parallel.sequence_parallel else 1
    return shards * (FP8_TOKEN_ALIGNMENT if model.fp8 else 1)


def geometry(model: ModelConfig, parallel: ParallelConfig,
             alignment: int | None = None) -> SequenceGeometry:
    """Sequence lengths for `model` at `parallel`; `alignment` overrides the one the layout
    needs (tests run FP8's alignment of 16 on CPU, where FP8 itself cannot run)."""
    vision, decoder = model.vision, model.decoder
    _, patch = vision.shape()
    num_patches = (vision.image_size // patch) ** 2
    align = alignment or sequence_alignment(model, parallel)
    prefix = int(vision.class_token) + vision.num_registers
    vit_tokens = prefix + num_patches
    kept = max(1, int(num_patches * vision.keep_ratio))
    text_len = decoder.caption_length - 1
    decoder_tokens = kept + text_len
    vit_seq = vit_tokens + -vit_tokens % align
    decoder_seq = decoder_tokens + -decoder_tokens % align
    notes = [f"{name} sequence padded {real} -> {padded} (a multiple of {align}) with "
             "positions no real token attends to"
             for name, real, padded in (("ViT", vit_tokens, vit_seq),
                                        ("decoder", decoder_tokens, decoder_seq))
             if padded != real]
    return SequenceGeometry(num_patches, vision.num_registers, prefix, vit_tokens, vit_seq,
                            kept, text_len, decoder_tokens, decoder_seq, align,
                            padded_vocab_size(decoder.vocab_size, decoder.vocab_pad_multiple),
                            tuple(notes))


def validate_model(model: ModelConfig, parallel: ParallelConfig,
                   device_capability: tuple[int, int] | None = None,
                   cuda_version: tuple[int, int] | None = None) -> SequenceGeometry:
    """The one validation step; returns the resolved geometry. Raises ValueError on bad input.

    `device_capability` is the GPU's (None: no GPU); `cuda_version` the CUDA that PyTorch is
    built with, read from torch when None (what TE compares against)."""
    vision, decoder = model.vision, model.decoder
    validate_parallel(parallel)  # first: the checks below divide by these sizes
    check_minimums("model.vision", vision, VISION_MINIMUMS)  # before shape(): 0 would fall
    check_minimums("model.decoder", decoder, DECODER_MINIMUMS)  # back to the variant's value
    _check(model.layernorm_eps > 0, f"model.layernorm_eps {model.layernorm_eps} must be > 0 "
           "(it keeps LayerNorm's division finite; reference 1e-6)")
    _check(model.init in ("official", "megatron"),
           f"model.init {model.init!r}: use 'official' (the OpenVision 2 code's initialisers) "
           "or 'megatron' (one std, model.init_std)")
    _check(model.init_std > 0, f"model.init_std {model.init_std} must be > 0 (reference 0.02)")
    _check(decoder.loss_weight > 0, f"model.decoder.loss_weight {decoder.loss_weight} must be "
           "> 0 (reference 2.0): at 0 the caption loss, the only loss, trains nothing")
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
    for name, approximate in (("vision", vision.gelu_approximate),
                              ("decoder", decoder.gelu_approximate)):
        _check(approximate in ("none", "tanh"),
               f"{name}.gelu_approximate {approximate!r}: use 'none' (exact) or 'tanh'")
    _check(decoder.loss_kernel in ("chunked", "plain"),
           f"decoder.loss_kernel {decoder.loss_kernel!r}: use 'chunked' or 'plain'")
    _check(decoder.pos_embed in ("none", "learned"),
           f"decoder.pos_embed {decoder.pos_embed!r}: use 'none' or 'learned'")
    _check(decoder.caption_length >= 4,
           f"decoder.caption_length {decoder.caption_length} must be at least 4 (BOS, a "
           "piece, EOS and the trailing PAD slot)")
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
    _check(not parallel.sequence_parallel or tp > 1,
           "parallel.sequence_parallel needs tensor parallelism (parallel.tensor > 1)")
    _check(model.transformer_impl in ("auto", "local", "transformer_engine"),
           f"transformer_impl {model.transformer_impl!r}: use auto, local or transformer_engine")
    if model.fp8:
        _validate_fp8(model, vit, dec, tp, device_capability, cuda_version)
    return geometry(model, parallel)


# Integer fields and their smallest legal value (None, where the field allows it, keeps the
# variant's value), with what the field counts, for the message.
VISION_MINIMUMS = {
    "image_size": (1, "input side in pixels, a multiple of the patch size"),
    "width": (1, "override of the variant's width; none keeps the variant's"),
    "depth": (1, "override of the variant's layer count; none keeps the variant's"),
    "mlp_dim": (1, "override of the variant's MLP width; none keeps the variant's"),
    "num_heads": (1, "override of the variant's head count; none keeps the variant's"),
    "patch_size": (1, "override of the variant's patch side; none keeps the variant's"),
    "in_channels": (1, "image channels, 3 for RGB"),
    "num_registers": (0, "learned register tokens, 0 in the official model"),
}
DECODER_MINIMUMS = {
    "width": (1, "override of the variant's width; none keeps the variant's"),
    "depth": (1, "override of the variant's layer count; none keeps the variant's"),
    "mlp_dim": (1, "override of the variant's MLP width; none keeps the variant's"),
    "num_heads": (1, "override of the variant's head count; none keeps the variant's"),
    "vocab_size": (1, "tokenizer pieces; follows data.tokenizer_model"),
    "vocab_pad_multiple": (1, "vocabulary padding multiple, 1024 keeps checkpoints portable"),
    "caption_length": (4, "BOS, a piece, EOS and the trailing PAD slot; reference 128"),
    "pad_id": (0, "the tokenizer's padding id"),
}
PARALLEL_MINIMUMS = {
    "tensor": (1, "tensor-parallel size, 1 for none"),
    "pipeline": (1, "pipeline-parallel size, 1 for none"),
    "virtual_pipeline": (2, "model chunks per pipeline rank; none for plain 1F1B"),
}


def check_minimums(prefix: str, config, minimums: dict[str, tuple[int, str]],
                   label: str | None = None) -> None:
    """Raise ValueError naming `label.field` (default `prefix.field`) and the `--set
    prefix.field=N` fix when an integer field is below its minimum (or not an integer); None
    passes where the field's type allows it (an optional override)."""
    optional = {f.name for f in dataclasses.fields(config) if "None" in str(f.type)}
    label = prefix if label is None else label
    for name, (low, meaning) in minimums.items():
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label}.{name} {value!r} must be >= {low} (an integer: "
                             f"{meaning}): --set {prefix}.{name}=N with N >= {low}")


def validate_parallel(parallel: ParallelConfig) -> None:
    """Sizes of the layout, before anything divides by them."""
    check_minimums("parallel", parallel, PARALLEL_MINIMUMS)
    _check(parallel.virtual_pipeline is None or parallel.pipeline > 1,
           "parallel.virtual_pipeline needs parallel.pipeline > 1")


def _validate_fp8(model, vit, dec, tp, device_capability, cuda_version) -> None:
    _check(model.fp8 in FP8_RECIPES, f"fp8 {model.fp8!r}: use one of {FP8_RECIPES} or None")
    _check(model.transformer_impl != "local",
           "fp8 needs transformer_impl 'transformer_engine' (or 'auto' on a GPU with TE)")
    _check(device_capability is not None,
           "fp8 needs a CUDA GPU with Transformer Engine; unset fp8 to run on CPU")
    problem = fp8_recipe_problem(model.fp8, tuple(device_capability),
                                 cuda_version or torch_cuda_version())
    if problem:
        raise ValueError(problem)
    for name, shape in (("vision", vit), ("decoder", dec)):
        for what, size in (("width", shape.width), ("MLP width", shape.mlp_dim)):
            _check((size // tp) % 16 == 0,
                   f"fp8: {name} {what} {size} / TP {tp} must be a multiple of 16 for FP8 GEMMs")


def fp8_recipe_problem(recipe: str, capability: tuple[int, int],
                       cuda: tuple[int, int] | None) -> str | None:
    """Why TE would refuse `recipe` on this GPU and CUDA, or None. The rules are TE's own
    (transformer_engine/pytorch/quantization.py, fp8.py before it; TE 2.9+):
    check_fp8_support (delayed, tensorwise), check_fp8_block_scaling_support (blockwise),
    check_mxfp8_support (mxfp8), check_nvfp4_support (nvfp4). TE also needs cuBLASLt
    12.1.3+ for FP8 on Ada, which only TE itself can see."""
    gpu = f"this GPU is sm{capability[0]}{capability[1]}"
    built = ("this PyTorch has no CUDA" if cuda is None
             else f"this PyTorch has CUDA {cuda[0]}.{cuda[1]}")
    field = f"model.fp8 {recipe!r}"
    if recipe in BLACKWELL_ONLY_FP8 and capability < (10, 0):
        return (f"{field} uses block-scaled MX/NVFP4 formats that only Blackwell (sm100+) "
                f"tensor cores execute; {gpu} (Hopper has none): use 'delayed', 'tensorwise' "
                "or 'blockwise'")
    if recipe == "mxfp8" and capability >= (12, 0):
        return (f"{field}: TE does not run MXFP8 on sm120+ (consumer Blackwell); {gpu}: use "
                "'tensorwise' (TE's default there) or 'nvfp4'")
    if recipe == "blockwise":
        if capability < (9, 0):
            return (f"{field} needs Hopper or newer (sm90+); {gpu}: use 'delayed' or "
                    "'tensorwise'")
        if cuda is None or cuda < (12, 9):
            return (f"{field} needs CUDA >= 12.9 for block-scaled FP8 GEMMs; {built}: use a "
                    "PyTorch/TE built with CUDA 12.9+, or 'tensorwise'")
    if recipe in ("delayed", "tensorwise"):
        if capability < (8, 9):
            return f"{field} needs Ada/Hopper or newer (sm89+); {gpu}: unset model.fp8"
        if capability < (9, 0) and (cuda is None or cuda < (12, 1)):
            return (f"{field} on Ada (sm89) needs CUDA >= 12.1; {built}: use a PyTorch/TE "
                    "built with CUDA 12.1+, or unset model.fp8")
    return None


def torch_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the CUDA PyTorch was built with; None for a CPU build."""
    import torch

    if not torch.version.cuda:
        return None
    major, minor = torch.version.cuda.split(".")[:2]
    return int(major), int(minor)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
