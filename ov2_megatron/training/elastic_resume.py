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

Both optimizer-state layouts megatron builds are read. torch's AdamW (no TE nor Apex, as on
CPU) keeps per parameter {step (0-d), exp_avg, exp_avg_sq}; Transformer Engine's and Apex's
FusedAdam (NGC containers) keep one int `step` per param group and per parameter the moments,
plus TE's `master_param` under megatron's precision-aware optimizer. Any per-parameter tensor
with one entry per element of the piece is cut like the moments, in its own dtype; a single
value (torch's 0-d `step`) is carried and must agree across the old ranks holding the
parameter; param-group entries (FusedAdam's `step`, lr, ...) must agree across the old ranks
whose group held parameters (Apex's FusedAdam, and TE's up to 2.18, count no step in a group
without parameters). Anything else is refused, naming the parameter or group, the key and the
file. TE's state_dict hands out fp16/fp8 moments unscaled in fp32, and its load_state_dict
quantizes them again with a scale from the new piece's largest value: those alone come back
re-rounded (a same-layout load re-quantizes them too).

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
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ov2_megatron.training import safe_unpickle
from ov2_megatron.training.optimizer import inner_optimizers, main_params

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
    pieces = {}  # name -> [_Piece]
    for path, entry in saved:
        per_param = entry["torch"]["state"]
        ids, groups = _ids_and_groups(entry["torch"]["param_groups"])
        for position, (name, start, end) in enumerate(entry["index"]):
            pieces.setdefault(name, []).append(_Piece(
                path, start, end, groups[position], entry["main_params"][position],
                per_param[ids[position]]))
    torch_state = opt.optimizer.state_dict()
    ids, groups = _ids_and_groups(torch_state["param_groups"])
    new_state = {}
    masters = main_params(opt)
    for position, (name, start, end) in enumerate(param_index(opt)):
        master, new_state[ids[position]] = _assemble(name, start, end, groups[position],
                                                     pieces.get(name, []))
        with torch.no_grad():
            masters[position].copy_(master)
    torch_state["param_groups"] = _carried_groups(saved, torch_state["param_groups"])
    torch_state["state"] = new_state
    opt.optimizer.load_state_dict(torch_state)


class _Piece(NamedTuple):
    """What one old rank held of one parameter."""

    path: str
    start: int  # elements [start, end) of the flattened parameter
    end: int
    group: int  # its param group in the torch optimizer
    master: torch.Tensor
    state: dict  # the torch optimizer's state for it


def _ids_and_groups(param_groups: list[dict]) -> tuple[list, list[int]]:
    """The state keys and the param group of each position, in the optimizer's order."""
    ids = [i for group in param_groups for i in group["params"]]
    groups = [g for g, group in enumerate(param_groups) for _ in group["params"]]
    return ids, groups


def _assemble(name: str, start: int, end: int, group: int, pieces: list[_Piece]):
    """This rank's range of parameter `name` from the old ranks' overlapping pieces: the
    master and the per-parameter optimizer state (tensors with one value per element cut
    element-wise, single values carried)."""
    if not pieces:
        raise ValueError(f"no old rank holds optimizer state for {name}: the checkpoint is "
                         "from another model")
    overlaps = [(piece, max(start, piece.start), min(end, piece.end)) for piece in pieces]
    overlaps = [(piece, low, high) for piece, low, high in overlaps if low < high]
    covered = sum(high - low for _, low, high in overlaps)
    if covered != end - start:
        raise ValueError(f"the old ranks' optimizer pieces cover {covered} of the {end - start} "
                         f"elements [{start}, {end}) of {name} this rank holds: a rank file is "
                         "missing or from another run")
    first = overlaps[0][0]
    for piece, _, _ in overlaps:
        if piece.group != group:  # its group's step and hyperparameters would be another's
            raise ValueError(f"{piece.path}: {name} is in optimizer param group {piece.group} "
                             f"there and in group {group} here: the checkpoint groups the "
                             "parameters otherwise (weight decay or LR multipliers)")
        if set(piece.state) != set(first.state):
            raise ValueError(f"{name}: optimizer state keys {sorted(piece.state)} in "
                             f"{piece.path}, {sorted(first.state)} in {first.path}")
    master = torch.empty(end - start, dtype=first.master.dtype)
    state = {key: _new_entry(name, key, start, end, [piece for piece, _, _ in overlaps])
             for key in first.state}
    for piece, low, high in overlaps:
        source = slice(low - piece.start, high - piece.start)
        target = slice(low - start, high - start)
        master[target] = piece.master.reshape(-1)[source]
        for key, value in piece.state.items():
            if _kind(value, piece) == "per element":
                state[key][target] = value.reshape(-1)[source]
    return master, state


def _kind(value, piece: _Piece) -> str | None:
    """"per element": one entry per element of `piece` (the moments, TE's master_param), cut
    like them; "single": one value for the parameter (torch's 0-d `step`), carried; None:
    neither, nothing exact to do with it."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return "single"
        return "per element" if value.numel() == piece.end - piece.start else None
    return "single" if value is None or isinstance(value, (bool, int, float)) else None


def _new_entry(name: str, key: str, start: int, end: int, pieces: list[_Piece]):
    """State `key` of this rank's piece of `name`: an empty tensor of the old pieces' dtype
    to fill element-wise, or the single value every old piece holds."""
    first = pieces[0].state[key]
    kind = _kind(first, pieces[0])
    for piece in pieces:
        value = piece.state[key]
        if _kind(value, piece) is None or _kind(value, piece) != kind:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{piece.path}: optimizer state {key!r} of {name} is {shape}, "
                             f"neither one value per element of its {piece.end - piece.start}"
                             "-element piece nor a single value like on the other old ranks: "
                             "cannot reshard it")
        if kind == "per element" and value.dtype != first.dtype:  # a copy would cast it
            raise ValueError(f"{name}: optimizer state {key!r} is {value.dtype} in {piece.path}"
                             f" and {first.dtype} in {pieces[0].path}")
        if kind == "single" and not _same(value, first):
            raise ValueError(f"{name}: optimizer state {key!r} is {value!r} in {piece.path} "
                             f"and {first!r} in {pieces[0].path}: the old ranks disagree")
    if kind == "per element":
        return torch.empty(end - start, dtype=first.dtype)
    return first.clone() if isinstance(first, torch.Tensor) else first


def _carried_groups(saved: list[tuple[str, dict]], new_groups: list[dict]) -> list[dict]:
    """This rank's param groups with the old ranks' entries (FusedAdam's `step`, lr, ...).

    They must agree across the old ranks on which the group held parameters. Apex's and TE's
    FusedAdam (up to TE 2.18) skip a group without parameters before counting its step, so
    a rank whose piece of the buffer held none of a group has a stale or no `step` there, and
    its vote does not count (megatron's DistributedOptimizer.state_dict ignores it too)."""
    old_groups = [(path, entry["torch"]["param_groups"]) for path, entry in saved]
    for path, groups in old_groups:
        if len(groups) != len(new_groups):
            raise ValueError(f"{path}: holds {len(groups)} optimizer param groups, this run "
                             f"has {len(new_groups)}: the parameters are grouped otherwise")
    carried = []
    for index, new in enumerate(new_groups):
        voters = [(path, groups[index]) for path, groups in old_groups]
        held = [(path, group) for path, group in voters if group["params"]] or voters[:1]
        first_path, first = held[0]
        for path, group in held[1:]:
            for key in (set(first) | set(group)) - {"params"}:
                if key not in first or key not in group or not _same(first[key], group[key]):
                    raise ValueError(f"optimizer param group {index} {key!r} is "
                                     f"{first.get(key)!r} in {first_path} and "
                                     f"{group.get(key)!r} in {path}: the old ranks disagree")
        carried.append(dict(first, params=new["params"]))
    return carried


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
