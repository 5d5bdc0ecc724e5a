"""GPU only: the local megatron spec on CUDA, with the GPU flags (fused bias-dropout-add and
bias-GELU, which megatron torch.compiles), computes the loss and every gradient that the
pure-PyTorch reference computes on the CPU from the same weights. This is the spec every GPU
without Transformer Engine trains with (tests/model/test_parity.py holds it to the reference
on CPU; test_transformer_engine_spec.py holds TE to it)."""

import pytest
import torch

from tests.harness import run_distributed

pytestmark = pytest.mark.gpu

CASES = [("causal", False), ("prefix", True)]  # both masks; sin-cos and learned positions


def local_steps_on_cuda(cases: list[tuple[str, bool]]) -> list[dict]:
    """Per case: loss, standard-named weights and gradients (on the CPU) of one fp32 step."""
    from ov2_megatron.config import ParallelConfig, validate_model
    from ov2_megatron.models import state_dict_adapter
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.distributed import tp_gather
    from tests.model.test_parity import VOCAB, batch, tiny_config

    # TF32 would round fp32 GEMMs (and the patch convolution) to 10 mantissa bits; the
    # comparison is with fp32 on the CPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    initialize(ParallelLayout(), seed=3)
    results = []
    for mask, learned in cases:
        cfg = tiny_config(mask, learned)
        geom = validate_model(cfg, ParallelConfig(), torch.cuda.get_device_capability())
        (chunk,) = build_chunks(cfg, ParallelConfig(), geom)  # fused kernels: the GPU default
        chunk.cuda()
        images, tokens, keep = batch(geom.num_patches, geom.num_kept)
        out = chunk(images.cuda(), tokens.cuda(), keep.cuda())
        loss = cfg.decoder.loss_weight * out["loss_sum"] / out["num_tokens"]
        loss.backward()

        def standard(full):
            return {k: v.cpu() for k, v in state_dict_adapter.to_standard(
                full, chunk.plan, 4, 4, VOCAB).items()}

        results.append(dict(loss=float(loss.detach()),
                            weights=standard(tp_gather.full_state(chunk)),
                            grads=standard(tp_gather.full_state(chunk, grads=True)),
                            registers=geom.num_registers, kept=geom.num_kept))
    return results


def test_local_spec_step_on_cuda_equals_reference():
    from tests.model.test_parity import reference_loss_and_grads

    (results,) = run_distributed(local_steps_on_cuda, 1, args=(CASES,))
    for (mask, learned), got in zip(CASES, results):
        ref_loss, ref_grads = reference_loss_and_grads(got["weights"], got["registers"],
                                                       got["kept"], mask, learned)
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-4), (mask, learned)
        for name, grad in got["grads"].items():
            want = ref_grads[name]
            if want is None:  # the pooled LayerNorm: the caption loss never reaches it
                assert grad.abs().max() == 0, name
                continue
            if name == "decoder.pos_embed":
                want = want[: grad.shape[0]]
            # GPU reductions sum in another order than the CPU's: ~1e-6 relative in fp32.
            torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, n=name: f"{mask}/{learned} {n}: {m}")
