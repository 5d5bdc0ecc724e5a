"""GPU only: the Transformer Engine layer spec computes the same model as the local spec
(same weights, bf16 tolerance), also when FP8's alignment pads the TE model's sequences (TE's
'padding' mask) and the local one runs unpadded, and an FP8 (tensorwise) step runs where TE
supports it. Both use the GPU flags (fused kernels on), so the GELU of each stack is the one
tests/model/test_activation.py proves on CPU."""

import pytest
import torch

from tests.harness import run_distributed

pytestmark = pytest.mark.gpu


def te_vs_local(fp8: str | None, align: int | None = None):
    from ov2_megatron.config import ParallelConfig, geometry, validate_model
    from ov2_megatron.models import specs
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.model.test_parity import batch, tiny_config

    if not specs.transformer_engine_available():
        return None
    initialize(ParallelLayout(), seed=0)
    results = {}
    for impl in ("local", "transformer_engine"):
        cfg = tiny_config("causal", learned=False)
        cfg.transformer_impl = impl
        cfg.fp8 = fp8 if impl == "transformer_engine" else None
        # FP8 needs 16-aligned widths: the tiny shape is 64/48 wide, 128/96 MLP.
        geom = validate_model(cfg, ParallelConfig(), torch.cuda.get_device_capability())
        if impl == "transformer_engine" and align:
            geom = geometry(cfg, ParallelConfig(), alignment=align)
            assert geom.vit_seq > geom.vit_tokens and geom.decoder_seq > geom.decoder_tokens
        torch.manual_seed(0)
        (model,) = build_chunks(cfg, ParallelConfig(), geom, impl=impl,
                                params_dtype=torch.bfloat16)
        model.cuda()
        if impl == "transformer_engine":  # copy the local weights, renaming fused norms
            renamed = {}
            for name, value in results["local_state"].items():
                for local, te in specs._LOCAL_TO_TE_NORM_KEYS.items():
                    name = name.replace(local, te)
                renamed[name] = value
            model.load_state_dict(renamed, strict=False)
        images, tokens, keep = batch(geom.num_patches, geom.num_kept)
        out = model(images.cuda(), tokens.cuda(), keep.cuda())
        loss = out["loss_sum"] / out["num_tokens"]
        loss.backward()
        results[impl] = float(loss)
        results[f"{impl}_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                    if "_extra_state" not in k}
    return results["local"], results["transformer_engine"]


def test_transformer_engine_spec_matches_local():
    result = run_distributed(te_vs_local, 1, args=(None,))[0]
    if result is None:
        pytest.skip("Transformer Engine is not installed on this GPU machine")
    local, te = result
    assert te == pytest.approx(local, rel=2e-2)


def test_transformer_engine_padded_matches_local_unpadded():
    result = run_distributed(te_vs_local, 1, args=(None, 12))[0]
    if result is None:
        pytest.skip("Transformer Engine is not installed on this GPU machine")
    local, te = result
    assert te == pytest.approx(local, rel=2e-2)


def test_fp8_tensorwise_step_is_finite():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm89+")
    result = run_distributed(te_vs_local, 1, args=("tensorwise",))[0]
    if result is None:
        pytest.skip("Transformer Engine is not installed on this GPU machine")
    local, fp8 = result
    assert torch.isfinite(torch.tensor(fp8)) and fp8 == pytest.approx(local, rel=0.1)
