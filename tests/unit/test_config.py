"""The one validation step: each bad setting is refused with the field and the fix, and
alignment pads with positions (never parameters, never dropped data) as the resolved
geometry says."""

import pytest

from ov2_megatron.config import (DecoderConfig, ModelConfig, ParallelConfig, VisionConfig,
                                 padded_vocab_size, validate_model)

L14 = ModelConfig(vision=VisionConfig(variant="L/14", image_size=224),
                  decoder=DecoderConfig(variant="L"))


def with_(vision=None, decoder=None, **model):
    return ModelConfig(vision=VisionConfig(**{"variant": "L/14", **(vision or {})}),
                       decoder=DecoderConfig(**(decoder or {})), **model)


def test_paper_geometry_at_224_and_84():
    geom = validate_model(L14, ParallelConfig())
    assert (geom.num_patches, geom.num_kept, geom.decoder_seq) == (256, 89, 89 + 127)
    geom = validate_model(with_({"image_size": 84}), ParallelConfig())
    assert (geom.num_patches, geom.num_kept) == (36, 12)  # the paper's 84 px numbers
    assert geom.notes == ()


def test_sequence_parallel_alignment_pads_positions_not_parameters():
    geom = validate_model(with_({"image_size": 84}), ParallelConfig(tensor=4, sequence_parallel=True))
    assert (geom.vit_tokens, geom.vit_seq, geom.num_registers) == (37, 40, 0)  # 1 + 36 -> 40
    assert (geom.num_kept, geom.decoder_tokens, geom.decoder_seq) == (12, 139, 140)
    assert geom.padding(139) == 1 and geom.padding(140) == 0
    assert geom.padded(geom.vit_tokens) == geom.vit_seq and geom.padded(140) == 140
    assert len(geom.notes) == 2 and "37 -> 40" in geom.notes[0] and "139 -> 140" in geom.notes[1]


def test_fp8_alignment_is_sixteen_and_leaves_the_model_as_it_is():
    plain = validate_model(with_(), ParallelConfig(tensor=2))
    geom = validate_model(with_(transformer_impl="transformer_engine", fp8="tensorwise"),
                          ParallelConfig(tensor=2), device_capability=(9, 0))
    assert (geom.vit_seq, geom.decoder_seq) == (272, 224)  # 257 -> 272, 89 + 127 -> 224
    # what a stage-2 checkpoint must match: the same registers and kept tokens as without FP8
    assert (geom.num_registers, geom.num_kept) == (plain.num_registers, plain.num_kept)
    # stage 1 (84 px) and stage 2 (224 px) under FP8 hold the same parameters (once 11 and 15
    # alignment registers, so stage 2 could not load stage 1)
    stage1 = validate_model(with_({"image_size": 84}, transformer_impl="transformer_engine",
                                  fp8="tensorwise"), ParallelConfig(tensor=2),
                            device_capability=(9, 0))
    assert stage1.num_registers == geom.num_registers == 0 and stage1.vit_seq == 48


@pytest.mark.parametrize("model,parallel,capability,message", [
    (with_(), ParallelConfig(tensor=3), None, "heads 16 not divisible by tensor-parallel size 3"),
    (with_({"keep_ratio": 0.0}), ParallelConfig(), None, "vision.keep_ratio 0.0 must be in (0, 1]"),
    (with_({"keep_ratio": 1.5}), ParallelConfig(), None, "vision.keep_ratio 1.5"),
    (with_({"image_size": 100}), ParallelConfig(), None, "not a multiple of the patch size 14"),
    (with_({"variant": "X/14"}), ParallelConfig(), None, "unknown ViT variant 'X/14'"),
    (with_(decoder={"mask": "full"}), ParallelConfig(), None, "decoder.mask 'full'"),
    (with_(), ParallelConfig(sequence_parallel=True), None, "needs tensor parallelism"),
    (with_(fp8="tensorwise"), ParallelConfig(), None, "fp8 needs a CUDA GPU"),
    (with_(fp8="mxfp8", transformer_impl="transformer_engine"), ParallelConfig(), (9, 0),
     "only Blackwell"),
    (with_(fp8="nvfp4", transformer_impl="transformer_engine"), ParallelConfig(), (9, 0),
     "Hopper has none"),
    (with_(fp8="bf8"), ParallelConfig(), (9, 0), "fp8 'bf8': use one of"),
    (with_(fp8="delayed", transformer_impl="local"), ParallelConfig(), (9, 0),
     "needs transformer_impl 'transformer_engine'"),
])
def test_bad_settings_name_field_and_fix(model, parallel, capability, message):
    with pytest.raises(ValueError) as info:
        validate_model(model, parallel, device_capability=capability)
    assert message in str(info.value)


def test_blackwell_accepts_mxfp8():
    validate_model(with_(fp8="mxfp8", transformer_impl="transformer_engine"), ParallelConfig(),
                   device_capability=(10, 0))


def test_vocab_padding_is_independent_of_tp():
    assert padded_vocab_size(30522, 1024) == 30720
    assert padded_vocab_size(32000, 1024) == 32768
    geoms = [validate_model(L14, ParallelConfig(tensor=tp)) for tp in (1, 2, 4)]
    assert {g.padded_vocab for g in geoms} == {32768}  # L/14 + decoder-L: TP 1, 2, 4
    with pytest.raises(ValueError, match="vocab_pad_multiple 102 is not divisible by"):
        validate_model(with_(decoder={"vocab_pad_multiple": 102}), ParallelConfig(tensor=4))
