"""Test-side helpers to compare sharded megatron modules with an unsharded run.

`full_tensor` undoes tensor-parallel sharding (all-gather along `partition_dim`); it relies
on megatron's own per-parameter attributes, so it works for any module built from megatron's
parallel layers. `seed_by_global_layer` gives every transformer layer the same weights in
every layout: each layer is filled from a seed made of its global layer number.
"""

import torch
import torch.distributed as dist


def full_tensor(param: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
    """Gather a TP-sharded parameter (or its grad, passed as `value`) into the full tensor."""
    from megatron.core import parallel_state

    value = param.detach() if value is None else value.detach()
    if not getattr(param, "tensor_model_parallel", False):
        return value.clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, value.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def full_state(module: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Name -> full (unsharded) parameter or gradient."""
    out = {}
    for name, param in module.named_parameters():
        grad = getattr(param, "main_grad", None) if grads else None
        if grads and grad is None:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)  # frozen
        out[name] = full_tensor(param, grad if grads else None)
    return out


def allreduce_sequence_parallel_grads(module: torch.nn.Module) -> None:
    """What finalize_model_grads does for replicated params under SP (norms, row biases)."""
    from megatron.core import parallel_state

    for param in module.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            dist.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())


def seed_by_global_layer(module: torch.nn.Module) -> None:
    """Fill each TransformerLayer's full weights from a seed of its global layer number, then
    keep this rank's shard, so every TP/PP layout holds the same model."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for layer in module.modules():
        if not isinstance(layer, TransformerLayer):
            continue
        gen = torch.Generator().manual_seed(1000 + layer.layer_number)
        for _, param in sorted(layer.named_parameters()):
            shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False)
            if sharded:
                shape[param.partition_dim] *= tp_size
            full = torch.randn(shape, generator=gen) * 0.2
            if param.ndim == 1 and not sharded:
                full = 1.0 + full  # norm scales around one
            if sharded:
                full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
            with torch.no_grad():
                param.copy_(full)
