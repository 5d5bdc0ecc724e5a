"""Resume on another data-parallel size: the distributed optimizer's state resharded, the data
position carried over.

megatron's distributed optimizer gives each data-parallel rank a contiguous piece of every
parameter's flattened elements (its fp32 master copy and Adam moments). Which piece depends
on the DP size and on the buffer padding, so a rank file is saved with an index: for each
entry of the torch optimizer, the parameter's name and the element range [start, end) it
holds. On a layout with the same TP, PP and virtual pipeline but another DP size, a rank reads
the rank files of every old data-parallel rank at its own (tp, pp) coordinates and copies,
element for element, the overlap of each old range with its new one: bitwise the same state,
only cut differently. Every element must be found exactly once, or the resume is refused.

The rank files are found from the coordinates each rank had (meta.json "ranks", [tp, pp, dp]
per global rank). The data states of all old replicas come with them (replica_stream.py keeps
the split, so no sample is repeated or skipped). RNG streams are taken from the old rank at
(tp, pp, dp mod old DP size).

megatron ships resharding formats of its own ("dp_reshardable", "fully_reshardable"); on its
plain-torch Adam path they trip on a fresh optimizer's missing `step`, a shared `step` tensor
and in-place copies into leaf views, and "dp_reshardable" resumed 3e-3 off
(../shared/docs/megatron_on_cpu.md). Copying ranges is exact and reads only tensors.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ov2_megatron.training import safe_unpickle
from ov2_megatron.training.optimizer import inner_optimizers, main_params

_MOMENTS = ("exp_avg", "exp_avg_sq")


def coordinates() -> list[int]:
    """[tp, pp, dp] of this rank."""
    return [parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank()]


def all_coordinates() -> list[list[int]]:
    """[tp, pp, dp] of every global rank, on every rank."""
    mine = coordinates()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def reshardable(saved_layout: dict, layout: dict) -> bool:
    """Whether only the data-parallel size (and sequence parallelism) differs."""
    same = ("tensor", "pipeline", "virtual_pipeline")
    return all(saved_layout.get(key) == layout[key] for key in same)


def param_index(opt) -> list[list]:
    """[[parameter name, start, end]] for each entry of `opt`'s torch optimizer, in its order:
    which piece of which parameter each fp32 master shard and its moments are."""
    names = {}
    for chunk_index, chunk in enumerate(opt.model_chunks):
        for name, param in chunk.named_parameters():
            names[param] = f"{chunk_index}/{name}"
    by_position = {}
    for param, (group, order) in opt.model_param_group_index_map.items():
        piece = opt._get_model_param_range_map(param)["param"]
        by_position[(group, order)] = [names[param], piece.start, piece.end]
    return [by_position[(group, order)]
            for group, entries in enumerate(opt.optimizer.param_groups)
            for order in range(len(entries["params"]))]


def old_rank_files(step_dir: str, ranks: list[list[int]]) -> list[str]:
    """The rank files at this rank's (tp, pp), one per old dp rank, in dp order."""
    tp, pp, _ = coordinates()
    mine = sorted((coords[2], rank) for rank, coords in enumerate(ranks)
                  if coords[0] == tp and coords[1] == pp)
    if not mine:
        raise ValueError(f"{step_dir}/meta.json lists no rank at tensor rank {tp}, pipeline "
                         f"rank {pp}: the layouts differ in more than the data-parallel size")
    return [os.path.join(step_dir, f"rank_{rank:05d}.pt") for _, rank in mine]


def load_resharded(files: list[str], optimizer, check) -> list[dict]:
    """Fill this rank's optimizer from the old ranks' `files`; returns their states (data
    and RNG parts). `check(path, index, saved, count)` vets each old optimizer state first."""
    states = [safe_unpickle.load_torch_file(path) for path in files]
    inner = inner_optimizers(optimizer)
    for path, state in zip(files, states):
        saved = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(inner) or \
                any("index" not in entry for entry in saved):
            raise ValueError(f"{path}: has no parameter index (saved before elastic resume, or "
                             "damaged): resume on the layout that wrote it")
        for index, entry in enumerate(saved):
            check(path, index, entry, len(entry["index"]))
    for index, opt in enumerate(inner):
        _reshard_one(opt, [(path, state["optimizers"][index]) for path, state
                           in zip(files, states)])
    return states


def _reshard_one(opt, saved: list[tuple[str, dict]]) -> None:
    pieces = {}  # name -> [(start, end, master, {moment: tensor}, step)]
    for path, entry in saved:
        per_param = entry["torch"]["state"]
        for position, (name, start, end) in enumerate(entry["index"]):
            pieces.setdefault(name, []).append(
                (start, end, entry["main_params"][position], per_param[position]))
    torch_state = opt.optimizer.state_dict()
    new_state = {}
    masters = main_params(opt)
    for position, (name, start, end) in enumerate(param_index(opt)):
        master, moments, step = _assemble(name, start, end, pieces.get(name, []))
        new_state[position] = {"step": step, **moments}
        with torch.no_grad():
            masters[position].copy_(master)
    groups = saved[0][1]["torch"]["param_groups"]
    torch_state["param_groups"] = [dict(old, params=new["params"]) for old, new
                                   in zip(groups, torch_state["param_groups"])]
    torch_state["state"] = new_state
    opt.optimizer.load_state_dict(torch_state)


def _assemble(name: str, start: int, end: int, pieces: list):
    """This rank's range of parameter `name` from the old ranks' overlapping pieces."""
    if not pieces:
        raise ValueError(f"no old rank holds optimizer state for {name}: the checkpoint is "
                         "from another model")
    dtype = pieces[0][2].dtype
    master = torch.empty(end - start, dtype=dtype)
    moments = {key: torch.empty(end - start, dtype=pieces[0][3][key].dtype) for key in _MOMENTS}
    covered, step = 0, None
    for old_start, old_end, old_master, old_state in pieces:
        low, high = max(start, old_start), min(end, old_end)
        if low >= high:
            continue
        source, target = slice(low - old_start, high - old_start), slice(low - start, high - start)
        master[target] = old_master.reshape(-1)[source]
        for key in _MOMENTS:
            moments[key][target] = old_state[key].reshape(-1)[source]
        covered += high - low
        step = old_state["step"]
    if covered != end - start:
        raise ValueError(f"the old ranks' optimizer pieces cover {covered} of the {end - start} "
                         f"elements [{start}, {end}) of {name} this rank holds: a rank file is "
                         "missing or from another run")
    return master, moments, (step.clone() if isinstance(step, torch.Tensor) else step)
