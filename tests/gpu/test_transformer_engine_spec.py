"""GPU only: the Transformer Engine layer spec computes the same model as the local spec
(same weights, bf16 tolerance), also when alignment pads the TE model's sequences (TE's
'padding' mask) and the local one runs unpadded, and an FP8 (tensorwise) step runs where TE
supports it. Both use the GPU flags (fused kernels on), so the GELU of each stack is the one
tests/model/test_activation.py proves on CPU."""

import pytest
import torch

from tests.harness import run_distributed

pytestmark = pytest.mark.gpu


def _skip_without_te() -> None:
    """Checked here, before any rank starts: a box without TE spends no NCCL start-up on it."""
    from ov2_megatron.models import specs

    if not specs.transformer_engine_available():
        pytest.skip("Transformer Engine is not installed on this GPU machine")


def te_vs_local(fp8: str | None, align: int | None = None) -> tuple[float, float]:
    """The loss of one forward/backward of the local model and of the TE model holding its
    weights. FP8 pads both sequences to 16 tokens (config.sequence_alignment), so with `fp8`
    both models run that geometry and only the TE layers' FP8 differs; `align` instead pads the
    TE model alone (the local one runs unpadded)."""
    from ov2_megatron.config import ParallelConfig, geometry, validate_model
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.models.state_dict_adapter import is_extra_state
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.training.checkpoint import load_state
    from tests.model.test_parity import batch, tiny_config

    initialize(ParallelLayout(), seed=0)
    capability = torch.cuda.get_device_capability()
    configs = {}
    for impl in ("local", "transformer_engine"):
        configs[impl] = tiny_config("causal", learned=False)
        configs[impl].transformer_impl = impl
        configs[impl].fp8 = fp8 if impl == "transformer_engine" else None
    # FP8 needs 16-aligned widths: the tiny shape is 64/48 wide, 128/96 MLP.
    te_geom = validate_model(configs["transformer_engine"], ParallelConfig(), capability)
    if align:
        te_geom = geometry(configs["transformer_engine"], ParallelConfig(), alignment=align)
        assert te_geom.vit_seq > te_geom.vit_tokens and te_geom.decoder_seq > te_geom.decoder_tokens
    local_geom = validate_model(configs["local"], ParallelConfig(), capability)
    if fp8:
        local_geom = geometry(configs["local"], ParallelConfig(), alignment=te_geom.alignment)
    losses, local_state = {}, None
    for impl, geom in (("local", local_geom), ("transformer_engine", te_geom)):
        torch.manual_seed(0)
        (model,) = build_chunks(configs[impl], ParallelConfig(), geom, impl=impl,
                                params_dtype=torch.bfloat16)
        model.cuda()
        if local_state is None:
            local_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                           if not is_extra_state(k)}
        else:
            # The checkpoint loader's name map (local pre-norms -> TE's fused ones); it refuses
            # any weight missing on either side, so no TE tensor keeps its random init.
            load_state(model, local_state, "the local model's state dict")
        images, tokens, keep = batch(geom.num_patches, geom.num_kept)
        out = model(images.cuda(), tokens.cuda(), keep.cuda())
        loss = out["loss_sum"] / out["num_tokens"]
        loss.backward()
        losses[impl] = float(loss.detach())
    return losses["local"], losses["transformer_engine"]


def test_transformer_engine_spec_matches_local():
    _skip_without_te()
    local, te = run_distributed(te_vs_local, 1, args=(None,))[0]
    assert te == pytest.approx(local, rel=2e-2)


def test_transformer_engine_padded_matches_local_unpadded():
    _skip_without_te()
    local, te = run_distributed(te_vs_local, 1, args=(None, 12))[0]
    assert te == pytest.approx(local, rel=2e-2)


def test_fp8_tensorwise_step_is_finite():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm89+")
    _skip_without_te()
    local, fp8 = run_distributed(te_vs_local, 1, args=("tensorwise",))[0]
    assert torch.isfinite(torch.tensor(fp8)) and fp8 == pytest.approx(local, rel=0.1)
