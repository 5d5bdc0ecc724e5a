"""FP8 before compute (issue #12): every rank's GEMM inputs have the shapes Transformer Engine
accepts, for any micro-batch, and recipes TE refuses on a GPU or CUDA are refused in
validation, naming model.fp8 and the fix. The rules are written here as TE states them, not
taken from the code under test."""

import math

import pytest

from ov2_megatron.config import (DecoderConfig, ModelConfig, ParallelConfig, VisionConfig,
                                 validate_model)


def te_accepts(shape: tuple[int, ...]) -> bool:
    """transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec: the product of all
    dimensions but the last divisible by 8, the last divisible by 16."""
    return math.prod(shape[:-1]) % 8 == 0 and shape[-1] % 16 == 0


def rank_gemm_inputs(seq: int, micro_batch: int, width: int, mlp: int, tp: int,
                     sp: bool) -> dict[str, tuple[int, ...]]:
    """What one TP rank's TE linears see in the forward pass ([s, b, h], megatron's layout).
    Column-parallel (LayerNormLinear) inputs are this rank's sequence shard under SP; the
    row-parallel inputs hold the full sequence and a 1/tp slice of the features."""
    local = seq // tp if sp else seq
    return {
        "linear_qkv input": (local, micro_batch, width),
        "linear_qkv weight": (3 * width // tp, width),
        "linear_proj input": (seq, micro_batch, width // tp),
        "linear_proj weight": (width, width // tp),
        "linear_fc1 input": (local, micro_batch, width),
        "linear_fc1 weight": (mlp // tp, width),
        "linear_fc2 input": (seq, micro_batch, mlp // tp),
        "linear_fc2 weight": (width, mlp // tp),
    }


def fp8_model(image_size: int, keep_ratio: float, caption_length: int) -> ModelConfig:
    # ViT-L/14 and decoder B: 16 and 8 heads, so every TP size up to 8 divides them.
    return ModelConfig(vision=VisionConfig(variant="L/14", image_size=image_size,
                                           keep_ratio=keep_ratio),
                       decoder=DecoderConfig(variant="B", caption_length=caption_length),
                       transformer_impl="transformer_engine", fp8="tensorwise")


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, False), (4, True),
                                   (8, False), (8, True)])
@pytest.mark.parametrize("image_size,keep_ratio,caption_length",
                         [(224, 0.35, 128), (84, 0.35, 80), (336, 0.25, 77)])
def test_every_rank_shard_meets_te_fp8_shape_rule(tp, sp, image_size, keep_ratio,
                                                 caption_length):
    model = fp8_model(image_size, keep_ratio, caption_length)
    geom = validate_model(model, ParallelConfig(tensor=tp, sequence_parallel=sp),
                          device_capability=(9, 0))
    vit, _ = model.vision.shape()
    dec = model.decoder.shape()
    for micro_batch in (1, 3, 5):
        for tower, seq, shape in (("vision", geom.vit_seq, vit), ("decoder", geom.decoder_seq,
                                                                  dec)):
            assert seq % tp == 0 or not sp
            for what, dims in rank_gemm_inputs(seq, micro_batch, shape.width, shape.mlp_dim,
                                               tp, sp).items():
                assert te_accepts(dims), (tower, what, dims, micro_batch)


def test_odd_micro_batches_at_tp4_sp_get_a_full_shard_alignment():
    # 257 ViT tokens: lcm(4, 16) = 16 would pad to 272, whose 68-row shards times an odd
    # micro-batch are not a multiple of 8; 64 (16 per shard) pads to 320.
    geom = validate_model(fp8_model(224, 0.35, 128),
                          ParallelConfig(tensor=4, sequence_parallel=True),
                          device_capability=(9, 0))
    assert (geom.alignment, geom.vit_seq, geom.decoder_seq) == (64, 320, 256)
    assert geom.num_registers == 0  # positions only, no parameters


# -- which recipe TE runs where (transformer_engine/pytorch/quantization.py, TE 2.9+) --------

def te_supports(recipe: str, capability: tuple[int, int], cuda: tuple[int, int]) -> bool:
    if recipe in ("delayed", "tensorwise"):  # check_fp8_support
        return capability >= (9, 0) or (capability >= (8, 9) and cuda >= (12, 1))
    if recipe == "blockwise":  # check_fp8_block_scaling_support
        return capability >= (9, 0) and cuda >= (12, 9)
    if recipe == "mxfp8":  # check_mxfp8_support: not on sm120+ (consumer Blackwell)
        return (10, 0) <= capability < (12, 0)
    if recipe == "nvfp4":  # check_nvfp4_support
        return capability >= (10, 0)
    raise AssertionError(recipe)


CAPABILITIES = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0),
                (12, 1)]
CUDA_VERSIONS = [(11, 8), (12, 0), (12, 1), (12, 4), (12, 8), (12, 9), (13, 0)]


def _validate(recipe, capability, cuda):
    model = ModelConfig(vision=VisionConfig(variant="L/14"), decoder=DecoderConfig(),
                        transformer_impl="transformer_engine", fp8=recipe)
    validate_model(model, ParallelConfig(), device_capability=capability, cuda_version=cuda)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8", "nvfp4"])
def test_recipes_are_refused_exactly_where_te_refuses_them(recipe):
    for capability in CAPABILITIES:
        for cuda in CUDA_VERSIONS:
            if te_supports(recipe, capability, cuda):
                _validate(recipe, capability, cuda)
            else:
                with pytest.raises(ValueError, match=f"model.fp8 '{recipe}'"):
                    _validate(recipe, capability, cuda)


@pytest.mark.parametrize("recipe,capability,cuda,fix", [
    ("blockwise", (9, 0), (12, 8), "CUDA >= 12.9"),
    ("blockwise", (8, 9), (12, 9), "needs Hopper or newer (sm90+)"),
    ("mxfp8", (12, 0), (12, 9), "sm120+ (consumer Blackwell)"),
    ("mxfp8", (9, 0), (12, 9), "only Blackwell (sm100+)"),
    ("nvfp4", (9, 0), (12, 9), "Hopper has none"),
    ("tensorwise", (8, 9), (12, 0), "on Ada (sm89) needs CUDA >= 12.1"),
    ("delayed", (8, 0), (12, 4), "needs Ada/Hopper or newer (sm89+)"),
])
def test_refusals_say_why_and_what_to_use(recipe, capability, cuda, fix):
    with pytest.raises(ValueError) as info:
        _validate(recipe, capability, cuda)
    message = str(info.value)
    assert message.startswith(f"model.fp8 '{recipe}'") and fix in message
    assert f"sm{capability[0]}{capability[1]}" in message or "CUDA" in message
    assert "use " in message or "unset model.fp8" in message


def test_cuda_version_defaults_to_the_one_torch_is_built_with(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError, match="this PyTorch has CUDA 12.8"):
        _validate("blockwise", (9, 0), None)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    _validate("blockwise", (9, 0), None)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build
    with pytest.raises(ValueError, match="this PyTorch has no CUDA"):
        _validate("blockwise", (10, 0), None)
