"""Checkpoints: model weights with megatron dist_checkpointing (any TP/PP layout can load
them), plus per-rank optimizer, RNG and data-loader state for an exact resume on the same
layout.

    checkpoints/step_00000100/   dist_checkpointing files, meta.json, rank_00000.pt ...
    checkpoints/latest           "step_00000100", replaced atomically

A step directory is written as `step_X.partial` and renamed only after every rank finished,
and `latest` moves only after that rename, so a kill during a save leaves `latest` on the
previous complete checkpoint (the partial directory is removed at the next start).
The per-rank files assume the same layout: on another layout the weights are loaded and
the optimizer restarts from them, and the resume says so.

Weights also move between the local and the Transformer Engine spec, both ways: their keys
are the same (the local spec saves its norms under TE's fused names) except for TE's FP8
`_extra_state` objects, which the load tolerates absent or left over, and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model

from ov2_megatron.models.state_dict_adapter import is_extra_state, other_spec_name
from ov2_megatron.training.optimizer import inner_optimizers

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def start_writer_shielded() -> None:
    """Start megatron's checkpoint-writer helper process now, with stop signals ignored.

    dist_checkpointing spawns a multiprocessing Manager at the first save. Spawned with the
    default handlers, a SIGTERM/SIGUSR1 sent to the whole job step (scancel, preemption,
    torchrun forwarding) kills it, and the very save that the signal asks for then fails with
    BrokenPipeError. Ignored dispositions survive the spawn, so the helper outlives them."""
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = write_results_queue_factory(filesystem_async)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        start()  # spawns the Manager that owns the queue, with the signals ignored
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_results_queue_factory(filesystem_async):
    """megatron's function that creates the writer's results queue: `get_write_results_queue`
    from 0.17 on (an optional mp_mode defaulting to 'spawn'), `_get_write_results_queue` in
    0.16. Raises naming both if a release has neither."""
    for name in ("get_write_results_queue", "_get_write_results_queue"):
        factory = getattr(filesystem_async, name, None)
        if callable(factory):
            return factory
    raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has "
                       "neither get_write_results_queue (0.17+) nor _get_write_results_queue "
                       "(0.16): re-validate checkpoint.start_writer_shielded on this release")


def layout_signature(parallel, world_size: int) -> dict:
    return dict(tensor=parallel.tensor, pipeline=parallel.pipeline,
                virtual_pipeline=parallel.virtual_pipeline,
                sequence_parallel=parallel.sequence_parallel, world_size=world_size)


def model_sharded_state(chunks: list) -> dict:
    """{'model0': ..., 'model1': ...}: one entry per virtual-pipeline chunk."""
    return {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def save(root: str, step: int, chunks: list, optimizer, scheduler, meta: dict,
         data_state) -> str:
    """Write checkpoint `step` under `root` (= run_dir/checkpoints); returns its path."""
    name = f"step_{step:08d}"
    final, partial = os.path.join(root, name), os.path.join(root, name + ".partial")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    dist_checkpointing.save(model_sharded_state(chunks), partial)
    _atomic_torch_save(_rank_state(optimizer, data_state),
                       os.path.join(partial, f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        meta = dict(meta, step=step, scheduler=scheduler.state_dict())
        with open(os.path.join(partial, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_latest(root, name)
    _barrier()
    return final


def prune(root: str, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest `keep_last` (rank 0 only)."""
    if _rank() != 0:
        return
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial"))
    for old in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def clean_partial(root: str) -> None:
    if _rank() == 0 and os.path.isdir(root):
        for entry in os.listdir(root):
            if entry.endswith(".partial"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    _barrier()


def resolve(path: str) -> str | None:
    """A run dir, a checkpoints/ dir or a step dir -> the step dir to load (None if none)."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(candidate, "meta.json")):
            return candidate
        latest = os.path.join(candidate, LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                step_dir = os.path.join(candidate, f.read().strip())
            if not os.path.isfile(os.path.join(step_dir, "meta.json")):
                raise FileNotFoundError(f"{latest} points at {step_dir}, which is not a complete "
                                        "checkpoint: restore the directory or delete `latest`")
            return step_dir
    return None


def read_meta(step_dir: str) -> dict:
    with open(os.path.join(step_dir, "meta.json")) as f:
        return json.load(f)


def load_weights(step_dir: str, chunks: list) -> None:
    """Load model weights into this rank's chunks, whatever layout and spec wrote them."""
    state = load_sharded(model_sharded_state(chunks), step_dir)
    for i, chunk in enumerate(chunks):
        load_state(unwrap_model(chunk), state[f"model{i}"], step_dir)


def load_sharded(sharded: dict, step_dir: str) -> dict:
    """dist_checkpointing.load of `sharded` (as model_sharded_state builds it).

    A local-spec checkpoint lacks `_extra_state` objects a TE model asks for (TE's final
    LayerNorm has one, torch's none) and a TE checkpoint holds some a local model does not ask
    for: those are skipped, and the modules keep their fresh FP8 metadata. Any other key the
    model needs and the checkpoint lacks, or the checkpoint holds and the model lacks, raises
    naming it, on every rank alike."""
    # megatron's names, from the request's side: "unexpected" = asked for but not saved,
    # "missing" = saved but asked for by no rank. RETURN_ALL drops the unexpected ones.
    state, not_asked, not_saved = dist_checkpointing.load(sharded, step_dir,
                                                          strict=StrictHandling.RETURN_ALL)
    not_saved = _on_any_rank({key for key in not_saved if not is_extra_state(key)})
    not_asked = {key for key in not_asked if not is_extra_state(key)}
    _refuse(step_dir, [f"the model needs {key}, which the checkpoint lacks"
                       for key in sorted(not_saved)] +
            [f"the checkpoint holds {key}, which the model lacks" for key in sorted(not_asked)])
    return state


def load_state(module: torch.nn.Module, state: dict, source: str) -> None:
    """`module.load_state_dict(state)` for a state dict written by either spec: the fused
    pre-norm names are mapped onto the module's own, and only `_extra_state` entries may be
    missing or left over. Checked before anything is copied; `source` names it in errors."""
    own = module.state_dict(keep_vars=True).keys()
    renamed = {}
    for name, value in state.items():
        other = other_spec_name(name)
        renamed[other if name not in own and other in own else name] = value
    _refuse(source, [f"the model needs {name}, which the state dict lacks" for name in own
                     if name not in renamed and not is_extra_state(name)] +
            [f"the state dict holds {name}, which the model lacks" for name in renamed
             if name not in own and not is_extra_state(name)])
    result = module.load_state_dict({k: v for k, v in renamed.items() if k in own}, strict=False)
    assert all(map(is_extra_state, result.missing_keys + result.unexpected_keys)), result


def _on_any_rank(keys: set) -> set:
    """The union over ranks (what one rank lacks, every rank reports, so none hangs)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return set().union(*gathered)


def _refuse(source: str, problems: list[str]) -> None:
    if problems:
        more = f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(f"{source} does not match this model: " + "; ".join(problems[:8])
                         + more)


def load_rank_state(step_dir: str, optimizer) -> object:
    """Restore optimizer shards and RNG streams of this rank; return its data-loader state."""
    state = torch.load(os.path.join(step_dir, f"rank_{_rank():05d}.pt"), weights_only=False)
    for opt, saved in zip(inner_optimizers(optimizer), state["optimizers"]):
        opt.optimizer.load_state_dict(saved["torch"])
        with torch.no_grad():
            for param, value in zip(_main_params(opt), saved["main_params"]):
                param.copy_(value)
    _set_rng_state(state["rng"])
    return state["data"]


def _rank_state(optimizer, data_state) -> dict:
    optimizers = [dict(torch=opt.optimizer.state_dict(),
                       main_params=[p.detach().clone() for p in _main_params(opt)])
                  for opt in inner_optimizers(optimizer)]
    return dict(optimizers=optimizers, rng=_rng_state(), data=data_state)


def _main_params(opt) -> list[torch.Tensor]:
    """The fp32 master shards the torch optimizer updates (views of the weights in fp32)."""
    return [p for group in opt.optimizer.param_groups for p in group["params"]]


def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state(),
                 tracker=tensor_parallel.get_cuda_rng_tracker().get_states())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def data_parallel_info() -> tuple[int, int]:
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
