"""A megatron TransformerBlock (local spec) forward+backward at TP=1, TP=2 and TP=2+SP gives
the same loss and the same (gathered) gradients."""

import pytest
import torch

from tests.harness import run_distributed

SEQ, BATCH, HIDDEN, HEADS, LAYERS = 8, 2, 32, 4, 2


def block_loss_and_grads(tp: int, sequence_parallel: bool):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.distributed import tp_gather

    initialize(ParallelLayout(tensor=tp), seed=3)
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        use_cpu_initialization=True, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel, hidden_dropout=0.0, attention_dropout=0.0,
    )
    block = TransformerBlock(config, get_gpt_layer_local_spec())
    tp_gather.seed_by_global_layer(block)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # causal
    if sequence_parallel:
        rank = parallel_state.get_tensor_model_parallel_rank()
        x = x.chunk(tp, dim=0)[rank]  # each TP rank holds a slice of the sequence
    # A fixed random readout (out.square() would be flattened by the final LayerNorm).
    target = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(1))
    if sequence_parallel:
        target = target.chunk(tp, dim=0)[rank]
    out = block(x.clone().requires_grad_(True), attention_mask=mask)  # [s(/tp), b, h]
    partial = (out * target).sum()
    partial.backward()
    partial = partial.detach().double()
    if sequence_parallel:
        torch.distributed.all_reduce(partial, group=parallel_state.get_tensor_model_parallel_group())
        tp_gather.allreduce_sequence_parallel_grads(block)
    return dict(loss=partial.item(), grads=tp_gather.full_state(block, grads=True))


@pytest.fixture(scope="module")
def reference():
    return run_distributed(block_loss_and_grads, 1, args=(1, False))[0]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_block_matches_tp1(reference, sequence_parallel):
    ranks = run_distributed(block_loss_and_grads, 2, args=(2, sequence_parallel))
    assert abs(reference["loss"]) > 1.0  # a real, non-trivial output
    for rank in ranks:
        assert rank["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        assert rank["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            assert grad.abs().max() > 1e-3, name  # well above fp32 round-off
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
