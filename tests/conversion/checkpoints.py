"""Real checkpoints for the conversion tests, written by the training code's own save path
(training/checkpoint.py) under any TP/PP layout, from the tiny_cpu model shape.

Every parameter is redrawn from a generator seeded by its standard name (LayerNorm scales
around one, biases and tokens non-zero) before saving, so a swapped or dropped tensor in a
conversion changes the features, and every layout writes the same model."""

from __future__ import annotations

import os
import zlib

STEP = 3


def tiny_run(output_dir: str, tp: int = 1, pp: int = 1, extra=()):
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.run_config import apply_overrides

    return apply_overrides(get_recipe("tiny_cpu"), [
        f"train.output_dir={output_dir}", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
        *extra])


def _value(name: str, shape):
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(tuple(shape), generator=gen)
    leaf = name.rsplit(".", 1)[-1]
    if ".ln" in name or ".norm." in name:
        return (1.0 + 0.2 * noise) if leaf == "weight" else 0.2 * noise
    if leaf == "bias":
        return 0.1 * noise
    if len(shape) >= 2 and not name.endswith(("registers", "pos_embed")):
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        return noise * fan_in ** -0.5
    return 0.5 * noise  # CLS token, registers, position tables


def randomize(chunk) -> None:
    """Overwrite every parameter of an OpenVision2 chunk, the same in every layout."""
    import torch
    from megatron.core import parallel_state

    from ov2_megatron.models.state_dict_adapter import standard_name

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in chunk.named_parameters():
        shape = list(param.shape)
        sharded = getattr(param, "tensor_model_parallel", False)
        if sharded:
            shape[param.partition_dim] *= tp
        value = _value(standard_name(name, chunk.plan), shape)
        if sharded:
            value = value.chunk(tp, dim=param.partition_dim)[tp_rank]
        with torch.no_grad():
            param.copy_(value)


def save_rank(output_dir: str, tp: int, pp: int, extra=()) -> str:
    """Run on tp*pp harness ranks: build, randomize and save through checkpoint.save."""
    import torch.distributed as dist
    from megatron.core.utils import unwrap_model

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.training import checkpoint, loop
    from ov2_megatron.training.run_config import validate_run

    run = tiny_run(output_dir, tp, pp, extra)
    geom = validate_run(run, dist.get_world_size())
    initialize(ParallelLayout(tp, pp), seed=run.train.seed)
    model, optimizer, scheduler = loop.build_model_and_optimizer(run, geom, "local")
    for chunk in model:
        randomize(unwrap_model(chunk))
    root = os.path.join(output_dir, "checkpoints")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            f.write(run.to_json())
    meta = dict(name=run.name, stage=run.stage,
                layout=checkpoint.layout_signature(run.parallel, dist.get_world_size()))
    return checkpoint.save(root, STEP, model, optimizer, scheduler, meta, None)


def save_rank_layouts(layouts: list[tuple[str, int, int, tuple]]) -> list[str]:
    """Several checkpoints from the same two processes (one start-up for all)."""
    return [save_rank(output_dir, tp, pp, extra) for output_dir, tp, pp, extra in layouts]


def make_checkpoints(*layouts: tuple[str, int, int, tuple]) -> list[str]:
    """(output_dir, tp, pp, overrides) each -> its step dir; every layout uses 2 ranks."""
    from tests.harness import run_distributed

    assert all(tp * pp == 2 for _, tp, pp, _ in layouts)
    return run_distributed(save_rank_layouts, 2, args=(list(layouts),), timeout=300)[0]
