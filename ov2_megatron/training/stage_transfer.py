"""Stage 2 starts from stage-1 weights at a new resolution.

With the default fixed sin-cos position table there is nothing to adapt: it is regenerated
for the new grid. A learned table is loaded at its stage-1 shape and resized (bicubic). Any
other shape change (widths, depths, vocabulary) means the checkpoint is not this model's
stage 1, and the load fails naming the tensor; so does another tokenizer, even one of the
same size (run_checks.check_same_tokenizer). The optimizer and LR schedule start fresh.
The checkpoint is verified and read as tensors only, as on a resume (checkpoint.resolve).
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_tensors_metadata
from megatron.core.utils import unwrap_model

from ov2_megatron.models.vision_encoder import interpolate_pos_embed
from ov2_megatron.training import checkpoint, run_checks, safe_unpickle

_RESIZABLE = "embedding.pos_embed"


def load_stage_weights(path: str, model: list, run) -> None:
    step_dir = checkpoint.resolve(path)
    if step_dir is None:
        raise FileNotFoundError(
            f"train.init_from {path!r}: no checkpoint there (expected a run directory with "
            "checkpoints/latest, or a step directory): run stage 1 first or fix the path")
    run_checks.check_same_tokenizer(checkpoint.read_meta(step_dir).get("tokenizer"),
                                    run_checks.tokenizer_identity(run.data.tokenizer_model),
                                    f"the stage-1 checkpoint {step_dir} (train.init_from)")
    safe_unpickle.check_metadata(step_dir)  # resolve() checked it on rank 0; each rank reads it
    saved = load_tensors_metadata(step_dir)
    sharded = checkpoint.model_sharded_state(model)
    resized = []
    for chunk_key, chunk_state in sharded.items():
        for name, tensor in chunk_state.items():
            if not isinstance(tensor, ShardedTensor) or tensor.key not in saved:
                continue
            old_shape = tuple(saved[tensor.key].global_shape)
            if old_shape == tuple(tensor.global_shape):
                continue
            if not tensor.key.endswith(_RESIZABLE):
                raise ValueError(f"train.init_from: {tensor.key} has shape {old_shape} in "
                                 f"{step_dir} but {tuple(tensor.global_shape)} here: not a "
                                 "stage 1 of this model")
            chunk_state[name] = ShardedTensor.from_rank_offsets(
                tensor.key, tensor.data.new_empty(old_shape), replica_id=tensor.replica_id)
            resized.append((chunk_key, name, tensor.data.shape[0]))
    state = checkpoint.load_sharded(sharded, step_dir)  # either spec wrote it (local <-> TE)
    for chunk_key, name, rows in resized:
        state[chunk_key][name] = interpolate_pos_embed(state[chunk_key][name], int(rows ** 0.5))
    for i, chunk in enumerate(model):
        checkpoint.load_state(unwrap_model(chunk), state[f"model{i}"], step_dir)
