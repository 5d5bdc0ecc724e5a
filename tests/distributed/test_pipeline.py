"""megatron's pipeline schedules on CPU/gloo: PP=2 (1F1B) and PP=2 x VPP=2 (interleaved) give
the same per-microbatch losses and gradient norm as the same model at PP=1.

Interleaving uses `overlap_p2p_comm=True, batch_p2p_comm=False`: with batched p2p, PP=2
interleaving silently returns wrong gradients (both neighbours are the same rank and the
sends cross; see ../shared/docs/megatron_on_cpu.md). The framework enforces that setting.
"""

import pytest
import torch

from tests.harness import run_distributed

SEQ, MICRO_BATCH, HIDDEN, HEADS, LAYERS, MICRO_BATCHES = 6, 2, 16, 2, 4, 4


class _Stage(torch.nn.Module):
    """A pipeline chunk: the first chunk reads the batch, the last one returns the loss."""

    def __init__(self, config, pre_process, post_process, vp_stage):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.enums import ModelType
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__()
        self.config, self.model_type = config, ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.block = TransformerBlock(
            config, get_gpt_layer_local_spec(), pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage)

    def set_input_tensor(self, tensors):
        self.block.set_input_tensor(tensors[0] if isinstance(tensors, list) else tensors)

    def forward(self, x):
        return self.block(x if self.pre_process else None, attention_mask=None)  # [s, b, h]


def pipeline_run(pp: int, vpp: int | None):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.distributed import tp_gather

    initialize(ParallelLayout(pipeline=pp, virtual_pipeline=vpp), seed=5)
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        use_cpu_initialization=True, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0,
        overlap_p2p_comm=vpp is not None, batch_p2p_comm=vpp is None,
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunks.append(_Stage(config, first, last, stage))
    for chunk in chunks:
        tp_gather.seed_by_global_layer(chunk)

    gen = torch.Generator().manual_seed(11)
    batches = [torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=gen) for _ in range(MICRO_BATCHES)]

    def forward_step(data_iterator, model):
        out = model(next(data_iterator))

        def loss_func(output):
            # A fixed random readout, so that every layer gets sizeable gradients.
            target = torch.randn(output.shape, generator=torch.Generator().manual_seed(3))
            loss = (output * target).mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    iterators = [iter(batches) for _ in chunks] if vpp else iter(batches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators,
        model=chunks if vpp else chunks[0], num_microbatches=MICRO_BATCHES, seq_length=SEQ,
        micro_batch_size=MICRO_BATCH, forward_only=False)
    sq = sum(p.grad.double().square().sum() for c in chunks for p in c.parameters())
    torch.distributed.all_reduce(sq, group=parallel_state.get_pipeline_model_parallel_group())
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return dict(losses=[d["loss"].item() for d in losses] if last else None,
                grad_norm=sq.sqrt().item())


@pytest.fixture(scope="module")
def reference():
    return run_distributed(pipeline_run, 1, args=(1, None))[0]


@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2_1f1b", "pp2_vpp2_interleaved"])
def test_pipeline_matches_pp1(reference, vpp):
    ranks = run_distributed(pipeline_run, 2, args=(2, vpp))
    assert len(reference["losses"]) == MICRO_BATCHES
    assert ranks[0]["losses"] is None
    for got, want in zip(ranks[1]["losses"], reference["losses"]):
        assert got == pytest.approx(want, rel=1e-5)
    for rank in ranks:
        assert rank["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert reference["grad_norm"] > 0
