"""encode(), greedy generation and bad-input errors of the megatron model (at TP=2), each
against the reference loaded with the same weights."""

import pytest
import torch

from tests.harness import run_distributed
from tests.model.test_parity import BATCH, CAPTION, IMAGE, PATCH, VOCAB, batch, tiny_config
from tests.reference.openvision2_reference import (DecoderConfig, OpenVision2Reference,
                                                   VisionConfig)


def _expect_error(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{fn} accepted bad input {[getattr(a, 'shape', a) for a in args]}")


def api_run():
    from ov2_megatron.config import ParallelConfig, validate_model
    from ov2_megatron.models import state_dict_adapter
    from ov2_megatron.models.generation import greedy_captions
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.distributed import tp_gather

    initialize(ParallelLayout(tensor=2), seed=5)
    cfg = tiny_config("causal", learned=False)
    parallel = ParallelConfig(tensor=2, sequence_parallel=True)
    geom = validate_model(cfg, parallel)
    (model,) = build_chunks(cfg, parallel, geom)
    model.eval()
    images, tokens, keep = batch(geom.num_patches, geom.num_kept)
    with torch.no_grad():
        patches, pooled = model.encode(images)
        big_patches, _ = model.encode(torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)))
    captions = greedy_captions(model, images, keep, bos_id=1, eos_id=2, caption_length=CAPTION)
    with torch.no_grad():  # evaluation without token dropping: every patch, in order
        every_patch = torch.arange(geom.num_patches).expand(BATCH, -1)
        all_logits = model.caption_logits(images, tokens, every_patch)
    bad_tokens = tokens.clone()
    bad_tokens[0, 3] = VOCAB
    errors = dict(
        size=_expect_error(model, torch.randn(2, 3, 48, 48), tokens[:2], keep[:2]),
        channels=_expect_error(model, torch.randn(2, 1, IMAGE, IMAGE), tokens[:2], keep[:2]),
        token=_expect_error(model, images, bad_tokens, keep),
    )
    weights = state_dict_adapter.to_standard(tp_gather.full_state(model), model.plan, 4, 4, VOCAB)
    return dict(weights=weights, patches=patches, pooled=pooled, big_patches=big_patches,
                captions=captions, all_logits=all_logits, errors=errors, registers=geom.num_registers,
                kept=geom.num_kept)


@pytest.fixture(scope="module")
def api():
    return run_distributed(api_run, 2)[0]


def _reference(api, image_size=IMAGE):
    ref = OpenVision2Reference(
        VisionConfig(image_size=image_size, patch_size=PATCH, width=64, depth=3, mlp_dim=128,
                     num_heads=4, num_registers=api["registers"]),
        DecoderConfig(dec_width=48, dec_depth=3, dec_mlp_dim=96, dec_num_heads=4,
                      vocab_size=VOCAB, pad_id=0))
    ref.load_state_dict(api["weights"])
    return ref.eval()


def test_encode_equals_reference_at_trained_and_new_resolution(api):
    images, _, _ = batch(16, 8)
    with torch.no_grad():
        patches, pooled = _reference(api).vision.encode(images)
        big, _ = _reference(api, 48).vision.encode(
            torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)))
    assert api["patches"].shape == (BATCH, 16, 64) and api["big_patches"].shape == (2, 36, 64)
    torch.testing.assert_close(api["patches"], patches, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(api["pooled"], pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(api["big_patches"], big, rtol=1e-4, atol=1e-5)


def test_logits_without_token_drop_equal_reference(api):
    images, tokens, _ = batch(16, api["kept"])
    with torch.no_grad():
        want = _reference(api)(images, tokens, None)["logits"]  # keep_idx None: every patch
    torch.testing.assert_close(api["all_logits"], want, rtol=1e-4, atol=1e-5)


def test_greedy_captions_equal_reference(api):
    images, _, keep = batch(16, api["kept"])
    # slots 1 .. L-2: the last slot is never a target in the official caption layout
    want = _reference(api).generate(images, keep, bos_id=1, eos_id=2, max_len=CAPTION - 1)
    got = api["captions"]
    assert torch.equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1]:] == 0).all()


def test_bad_inputs_are_named(api):
    assert "48x48 px" in api["errors"]["size"] and "vision.image_size" in api["errors"]["size"]
    assert "[batch, 3, 32, 32]" in api["errors"]["channels"]
    assert "outside the vocabulary [0, 100)" in api["errors"]["token"]
