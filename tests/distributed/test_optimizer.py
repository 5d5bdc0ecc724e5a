"""megatron DDP + the distributed optimizer at TP=2 x DP=2 with sequence parallelism: two
AdamW steps (weight decay skipping norms and biases, through megatron's param scheduler) give
the same weights as torch.optim.AdamW on the unsharded model fed both data-parallel batches."""

import pytest
import torch

from tests.harness import run_distributed

SEQ, BATCH, HIDDEN, HEADS, LAYERS, STEPS = 8, 2, 16, 2, 2, 2
# eps well above fp32 round-off: the key bias has an exactly-zero true gradient (softmax is
# shift-invariant), and Adam with a tiny eps would turn its round-off noise into full steps.
LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-4


def _block(tp: int, sequence_parallel: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from tests.distributed import tp_gather

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        use_cpu_initialization=True, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel, hidden_dropout=0.0, attention_dropout=0.0)
    block = TransformerBlock(config, get_gpt_layer_local_spec())
    tp_gather.seed_by_global_layer(block)
    return config, block


def _batch(step: int, dp_rank: int) -> torch.Tensor:
    return torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(100 * step + dp_rank))


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed random readout: unlike out.square(), it is not flattened by the final LayerNorm,
    so every layer gets gradients well above fp32 round-off."""
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * target).mean()


def sharded_training(tp: int = 2, sequence_parallel: bool = True):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.distributed import tp_gather

    initialize(ParallelLayout(tensor=tp), seed=9)
    config, block = _block(tp=tp, sequence_parallel=sequence_parallel)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                              grad_reduce_in_fp32=True), block)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WD, adam_beta1=BETAS[0],
                        adam_beta2=BETAS[1], adam_eps=EPS, use_distributed_optimizer=True,
                        clip_grad=0.0), [model])
    OptimizerParamScheduler(optimizer, init_lr=LR, max_lr=LR, min_lr=LR, lr_warmup_steps=0,
                            lr_decay_steps=10, lr_decay_style="constant", start_wd=WD,
                            end_wd=WD, wd_incr_steps=10, wd_incr_style="constant")
    dp_rank = parallel_state.get_data_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for step in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        x = _batch(step, dp_rank)
        if sequence_parallel:
            x = x.chunk(tp, dim=0)[tp_rank]  # this rank's sequence slice
        out = model(x, attention_mask=None)
        full = out
        if sequence_parallel:
            # Every TP rank computes the same full loss, so the gather's backward only splits.
            full = tensor_parallel.gather_from_sequence_parallel_region(
                out, tensor_parallel_output_grad=False)
        _loss(full).backward()
        finalize_model_grads([model])
        ok, _, _ = optimizer.step()
        assert ok
    return tp_gather.full_state(block)


def reference_training():
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(), seed=9)
    _, block = _block(tp=1, sequence_parallel=False)
    decay = [p for n, p in block.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in block.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, eps=EPS)
    for step in range(STEPS):
        optimizer.zero_grad()
        for dp_rank in range(2):  # the data-parallel mean of the two replicas' losses
            (_loss(block(_batch(step, dp_rank), attention_mask=None)) / 2).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in block.named_parameters()}


def test_distributed_optimizer_equals_torch_adamw():
    reference = run_distributed(reference_training, 1)[0]
    ranks = run_distributed(sharded_training, 4)
    initial = run_distributed(_initial_weights, 1)[0]
    for name, want in reference.items():
        moved = (want - initial[name]).abs().max()
        assert moved > 1e-3 or "linear_qkv.bias" in name, f"{name} did not train"  # the comparison below means something
        for rank in ranks:
            torch.testing.assert_close(rank[name], want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")


def _initial_weights():
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(), seed=9)
    return {n: p.detach().clone() for n, p in _block(1, False)[1].named_parameters()}
