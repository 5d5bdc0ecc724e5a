"""Checkpoints: model weights with megatron dist_checkpointing (any TP/PP layout can load
them), plus per-rank optimizer, RNG and data-loader state for an exact resume on the same
layout.

    checkpoints/step_00000100/   dist_checkpointing files, meta.json, rank_00000.pt ...,
                                 manifest.json
    checkpoints/latest           "step_00000100", replaced atomically

A step directory is written as `step_X.partial` and renamed only after every rank finished,
and `latest` moves only after that rename, so a kill during a save leaves `latest` on the
previous complete checkpoint (the partial directory is removed at the next start).
A failed save (a full disk: "no space left on device") removes it at once, on every rank.
The last file written is `manifest.json` (checkpoint_manifest.py): every file's size and
sha256, verified before a load; a damaged `latest` falls back to the newest checkpoint that
verifies (checkpoint_resolve.py: which step directory a run loads). Nothing is unpickled
beyond tensors and plain data (safe_unpickle.py).
The per-rank files are read as they are on the same layout, and resharded on another
data-parallel size (elastic_resume.py: each holds an index of the parameter pieces it has,
and meta.json the coordinates of each rank); on another TP/PP layout the weights are loaded
and the optimizer restarts from them, and the resume says so.

Weights also move between the local and the Transformer Engine spec, both ways: their keys
are the same (the local spec saves its norms under TE's fused names) except for TE's FP8
`_extra_state` objects, which the load tolerates absent or left over, and nothing else.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import random
import shutil
import traceback

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from ov2_megatron.models.state_dict_adapter import is_extra_state, other_spec_name
from ov2_megatron.training import (checkpoint_manifest, elastic_resume, process_lifetime,
                                   safe_unpickle)
from ov2_megatron.training.checkpoint_resolve import (LATEST, global_rank, read_latest,
                                                     resolve)  # noqa: F401
from ov2_megatron.training.optimizer import inner_optimizers, main_params

def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_writer_manager = None  # the Manager process behind megatron's write-results queue


def start_writer_shielded() -> None:
    """Start megatron's checkpoint-writer helper process now: stop signals ignored, and
    tied to this process, so it can neither break a save nor outlive the rank.

    dist_checkpointing spawns a multiprocessing Manager (its write-results queue) at the first
    save, with default handlers: a SIGTERM/SIGUSR1 sent to the whole job step or process group
    (scancel, preemption, torchrun's killpg) killed it, and the very save the signal asked for
    failed with BrokenPipeError. So the Manager is started here, the way megatron would
    (spawn), with process_lifetime.shield_helper as its initializer (signals ignored, SIGKILL
    when this process ends, even by SIGKILL), and megatron's module-level queue is set to it;
    megatron's factory then returns it. Forked children (megatron 0.16's write workers) are
    tied to this process too. The stop signals stay blocked while the Manager starts: they
    wait (the child unblocks them once ignored), none is lost in the parent."""
    global _writer_manager
    import multiprocessing
    import signal
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write_results_queue_factory(filesystem_async)  # a release this code knows
    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has no "
                           "_results_queue: re-validate checkpoint.start_writer_shielded")
    process_lifetime.tie_forked_children()
    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    # spawn starts the resource tracker first, and its start unblocks SIGTERM again: start it
    # before blocking (a running tracker is reused as it is).
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, process_lifetime.STOP_SIGNALS)
    try:
        manager.start(process_lifetime.shield_helper, (os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _writer_manager = manager
    filesystem_async._results_queue = manager.Queue()


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
    """Write checkpoint `step` under `root` (= run_dir/checkpoints); returns its path.

    A failure on any rank fails the save on every rank alike, naming the directory, with
    `latest` left on the previous checkpoint; on a full disk ("no space left on device") the
    staging directory is removed at once, since its bytes are what the disk lacks."""
    with process_lifetime.checkpoint_in_progress():  # a second Ctrl-C lets it complete
        return _save(root, step, chunks, optimizer, scheduler, meta, data_state)


def _save(root: str, step: int, chunks: list, optimizer, scheduler, meta: dict,
          data_state) -> str:
    name = f"step_{step:08d}"
    final, partial = os.path.join(root, name), os.path.join(root, name + ".partial")
    if global_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    error, writer_errors = None, _WriterErrors()
    try:
        with writer_errors:
            dist_checkpointing.save(model_sharded_state(chunks), partial)
        _write_rank_state(_rank_state(optimizer, data_state),
                          os.path.join(partial, f"rank_{global_rank():05d}.pt"))
    except _CHECKPOINT_ERRORS as caught:  # every rank raises when one writer fails
        error = caught
        for message in writer_errors.messages:  # traceback.format_exception shows notes
            error.add_note(message)
    _fail_together(error, root, partial)
    ranks = elastic_resume.all_coordinates()  # where each rank file sits in the layout
    if global_rank() == 0:
        try:
            meta = dict(meta, step=step, scheduler=scheduler.state_dict(), ranks=ranks)
            with open(os.path.join(partial, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2, default=str)
            checkpoint_manifest.write(partial)  # last: a listed directory is a complete one
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_latest(root, name)
        except _CHECKPOINT_ERRORS as caught:
            error = caught
    _fail_together(error, root, partial)
    return final


class _WriterErrors(logging.Handler):
    """The errors megatron's checkpoint writer logs. megatron-core 0.19 raises only the
    exception's class ("error: <class 'OSError'>") when its in-process writer fails; the
    errno text ("[Errno 28] No space left on device") is only in its log record."""

    _LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger(self._LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(self._LOGGER).removeHandler(self)


# torch.distributed.checkpoint's CheckpointException (how a failed write reaches every rank)
# derives from BaseException, not Exception.
_CHECKPOINT_ERRORS = (Exception, CheckpointException)


def _fail_together(error: Exception | None, root: str, partial: str) -> None:
    """Raise on every rank if `error` happened on any: what failed where, with the staging
    directory removed first (rank 0) and `latest` untouched."""
    mine = None if error is None else (_is_no_space(error, partial), _first_line(error))
    failures = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, mine)
    failed = {rank: f for rank, f in enumerate(failures) if f is not None}
    if not failed:
        return
    previous = read_latest(root)
    kept = f"`latest` stays on {previous}" if previous else "no earlier checkpoint"
    ranks = ",".join(map(str, failed))
    if any(no_space for no_space, _ in failed.values()):
        # Its bytes are what the disk lacks: removed now, not at the next start.
        if global_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        raise OSError(errno.ENOSPC, f"no space left on device while saving checkpoint {partial} "
                      f"(rank {ranks}): removed it, {kept}; free space under {root} and resume")\
            from error
    detail = next(iter(failed.values()))[1]
    raise RuntimeError(f"saving checkpoint {partial} failed on rank {ranks}: {detail}; {kept} "
                       "(the next start removes the partial directory)") from error


_WRITE_FAILURE_TEXT = ("No space left on device", "[Errno 28]", "unexpected pos",
                       "basic_ios::clear", "file write failed")


def _is_no_space(error: Exception, partial: str) -> bool:
    """ENOSPC anywhere in the chain, or in the text megatron's writer forwards (its worker's
    exception crosses a process/rank boundary as a string), or torch's C++ writer's failure
    text ("unexpected pos", "basic_ios::clear") on a file system that is (nearly) full."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if "No space left on device" in text or "[Errno 28]" in text:
        return True
    if any(marker in text for marker in _WRITE_FAILURE_TEXT):
        try:
            return shutil.disk_usage(os.path.dirname(partial)).free < _NEARLY_FULL
        except OSError:
            return False
    return False


_NEARLY_FULL = 64 << 20


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def prune(root: str, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest `keep_last` (rank 0 only)."""
    if global_rank() != 0:
        return
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial"))
    for old in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def clean_partial(root: str) -> None:
    if global_rank() == 0 and os.path.isdir(root):
        for entry in os.listdir(root):
            if entry.endswith(".partial"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    _barrier()


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
    safe_unpickle.check_metadata(step_dir)  # before torch unpickles it
    # Objects (TE's FP8 `_extra_state`) are pickles that torch loads with weights_only=False
    # and TE unpickles again: never asked for, so a checkpoint can only hand over tensors.
    # Their modules keep fresh FP8 scaling metadata, which TE re-derives in a few steps.
    sharded = _without_objects(sharded)
    # megatron's names, from the request's side: "unexpected" = asked for but not saved,
    # "missing" = saved but asked for by no rank. RETURN_ALL drops the unexpected ones.
    try:
        state, not_asked, not_saved = dist_checkpointing.load(sharded, step_dir,
                                                              strict=StrictHandling.RETURN_ALL)
    except _CHECKPOINT_ERRORS as error:  # torch.distributed.checkpoint's errors rarely name files
        raise ValueError(f"{step_dir}: reading the weights failed: {_first_line(error)}") \
            from error
    not_saved = _on_any_rank({key for key in not_saved if not is_extra_state(key)})
    not_asked = {key for key in not_asked if not is_extra_state(key)}
    _refuse(step_dir, [f"the model needs {key}, which the checkpoint lacks"
                       for key in sorted(not_saved)] +
            [f"the checkpoint holds {key}, which the model lacks" for key in sorted(not_asked)])
    return state


def _without_objects(sharded):
    if isinstance(sharded, dict):
        return {key: _without_objects(value) for key, value in sharded.items()
                if not isinstance(value, ShardedObject)}
    if isinstance(sharded, list):
        return [_without_objects(value) for value in sharded
                if not isinstance(value, ShardedObject)]
    return sharded


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
    """Restore optimizer shards and RNG streams of this rank; return its data-loader state.

    Read as tensors and plain data only. Refused, naming the file and what is wrong, if it
    lacks an optimizer's moments for any parameter or holds a non-finite value: either would
    otherwise continue training silently from a restarted or poisoned Adam state."""
    path = os.path.join(step_dir, f"rank_{global_rank():05d}.pt")
    state = safe_unpickle.load_torch_file(path)
    inner = inner_optimizers(optimizer)
    saved_all = state.get("optimizers") if isinstance(state, dict) else None
    if not isinstance(saved_all, list) or len(saved_all) != len(inner):
        raise ValueError(f"{path}: holds {0 if not isinstance(saved_all, list) else len(saved_all)}"
                         f" optimizer states, this run has {len(inner)}: not this run's rank "
                         "file, or damaged")
    for index, (opt, saved) in enumerate(zip(inner, saved_all)):
        _check_optimizer_state(path, index, saved, len(main_params(opt)))
    for opt, saved in zip(inner, saved_all):
        opt.optimizer.load_state_dict(saved["torch"])
        with torch.no_grad():
            for param, value in zip(main_params(opt), saved["main_params"]):
                param.copy_(value)
    _set_rng_state(state["rng"])
    return state["data"]


def load_resharded_state(step_dir: str, meta: dict, optimizer) -> list:
    """Resume on another data-parallel size (elastic_resume.py): this rank's optimizer pieces
    and RNG streams from the old ranks at its (tp, pp); returns every old replica's data
    state. Each old optimizer state is vetted as in load_rank_state."""
    if "ranks" not in meta:
        raise ValueError(f"{step_dir}/meta.json has no rank coordinates (written before elastic "
                         "resume): resume on the layout that wrote it")
    files = elastic_resume.old_rank_files(step_dir, meta["ranks"])
    states = elastic_resume.load_resharded(files, optimizer, _check_optimizer_state)
    dp = elastic_resume.coordinates()[2]
    _set_rng_state(states[dp % len(states)]["rng"])
    return [state["data"] for state in states]


def _check_optimizer_state(path: str, index: int, saved: dict, num_params: int) -> None:
    """Refuse a saved optimizer state that lacks a parameter's Adam moments or step count, or
    holds a non-finite value. Both layouts megatron builds pass: torch's AdamW keeps `step`
    per parameter, TE's and Apex's FusedAdam keep it per param group."""
    where = f"{path}: optimizer {index}"
    torch_state = saved.get("torch", {}) if isinstance(saved, dict) else {}
    per_param, groups = torch_state.get("state", {}), torch_state.get("param_groups", [])
    ids = [i for group in groups for i in group.get("params", [])]
    main = saved.get("main_params", []) if isinstance(saved, dict) else []
    if len(ids) != num_params or len(main) != num_params:
        raise ValueError(f"{where} lists {len(ids)} parameters and {len(main)} master weights, "
                         f"this run's has {num_params}: not this run's rank file, or damaged")
    missing = [i for i in ids if not all(key in (per_param.get(i) or {})
                                         for key in ("exp_avg", "exp_avg_sq"))]
    if missing:
        raise ValueError(f"{where} has no moments for {len(missing)} of {num_params} parameters "
                         f"(first: parameter {missing[0]}): the optimizer state is missing, and "
                         "resuming would silently restart Adam")
    uncounted = [i for group in groups if "step" not in group
                 for i in group.get("params", []) if "step" not in per_param[i]]
    if uncounted:
        raise ValueError(f"{where} has no step count for {len(uncounted)} of {num_params} "
                         f"parameters (first: parameter {uncounted[0]}), neither per parameter "
                         "(torch's AdamW) nor in its param group (FusedAdam): resuming would "
                         "silently restart Adam's bias correction")
    tensors = [(f"master weight {i}", t) for i, t in enumerate(main)]
    tensors += [(f"parameter {i} {name}", t) for i in ids for name, t in per_param[i].items()]
    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() \
                and not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: {name} {tuple(tensor.shape)} holds non-finite values "
                             "(NaN/inf): refusing to resume from a poisoned optimizer state")


def _rank_state(optimizer, data_state) -> dict:
    optimizers = [dict(torch=opt.optimizer.state_dict(),
                       main_params=[p.detach().clone() for p in main_params(opt)],
                       index=elastic_resume.param_index(opt))
                  for opt in inner_optimizers(optimizer)]
    return dict(optimizers=optimizers, rng=_rng_state(), data=data_state)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                       has_gauss=int(has_gauss), gauss=float(gauss))  # tensors, not arrays
    state = dict(python=random.getstate(), numpy=numpy_state,
                 torch=torch.get_rng_state(),
                 tracker=tensor_parallel.get_cuda_rng_tracker().get_states())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                 saved["has_gauss"], saved["gauss"])
    np.random.set_state(saved)  # a tuple with an array in rank files from before
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_rank_state(state: dict, path: str) -> None:
    """torch.save through a Python file (so a full disk raises OSError ENOSPC rather than
    torch's C++ stream errors), renamed into place. The data-loader and RNG parts are
    checked to load with weights_only=True first, so a resume can read what is written."""
    light = io.BytesIO()
    torch.save(dict(rng=state["rng"], data=state["data"]), light)
    light.seek(0)
    try:
        torch.load(light, weights_only=True)
    except pickle.UnpicklingError as error:
        raise TypeError(f"the data-loader or RNG state is not plain data (tensors, containers, "
                        f"numbers, strings), so a resume could not read it: {error}") from None
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
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
