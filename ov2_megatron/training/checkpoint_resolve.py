"""Which checkpoint a run resumes from: a run dir, a checkpoints/ dir or a step dir -> the
step dir to load, every candidate verified against its manifest (checkpoint_manifest.py) and
its pickled files against the allow-list (safe_unpickle.py) before anything is read.
A damaged or missing `latest` falls back to the newest step directory that verifies, saying
so; checkpoints that exist but none verifies are an error, never a silent fresh start.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from ov2_megatron.training import checkpoint_manifest, safe_unpickle

LATEST = "latest"


def global_rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def resolve(path: str) -> str | None:
    """A run dir, a checkpoints/ dir or a step dir -> the step dir to load (None if none).

    Every candidate is verified against its manifest (sizes and sha256) before anything is
    read from it. In a checkpoints/ dir, `latest` is tried first; if it is damaged, incomplete
    or missing, the newest step directory that verifies is used, and the fallback is printed
    in one line. A step dir named directly must verify. Raises (naming each checkpoint and
    what is wrong with it) if checkpoints exist but none verifies: never a silent fresh start.
    Rank 0 reads the files; every rank gets its answer."""
    answer = None
    if global_rank() == 0:
        try:
            answer = ("ok", _resolve_verified(path))
        except Exception as error:
            answer = ("error", f"{type(error).__name__}\0{error}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    kind, value = answer
    if kind == "error":
        error_type, message = value.split("\0", 1)
        raise (FileNotFoundError if error_type == "FileNotFoundError" else ValueError)(message)
    return value


def _resolve_verified(path: str) -> str | None:
    if _is_step_dir(path):
        _require_verified(path)
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        steps = _step_dirs(candidate)
        latest = read_latest(candidate)
        if latest is None and not steps:
            continue
        order = ([latest] if latest else []) + [s for s in steps if s != latest]
        rejected = []
        if latest is None:
            print(f"{candidate}: `{LATEST}` is missing but {len(steps)} step director"
                  f"{'y is' if len(steps) == 1 else 'ies are'} present: resuming from the newest "
                  "that verifies", flush=True)
        for name in order:
            step_dir = os.path.join(candidate, name)
            problem = checkpoint_manifest.verify(step_dir)
            if problem in (None, checkpoint_manifest.LEGACY):
                problem = problem or _check_pickles(step_dir)
            if problem in (None, checkpoint_manifest.LEGACY):
                if problem == checkpoint_manifest.LEGACY:
                    print(f"warning: {step_dir} was written before checkpoint manifests: "
                          "loading it unverified (damage in it goes undetected)", flush=True)
                if rejected:
                    print(f"falling back to {step_dir}, the newest checkpoint that verifies",
                          flush=True)
                return step_dir
            print(f"checkpoint {step_dir} is unusable: {problem}", flush=True)
            rejected.append(f"{name}: {problem}")
        raise ValueError(f"no checkpoint in {candidate} verifies ({'; '.join(rejected)}): "
                         "restore one, or move the directory away to start from scratch")
    return None


def _require_verified(step_dir: str) -> None:
    problem = checkpoint_manifest.verify(step_dir)
    if problem == checkpoint_manifest.LEGACY:
        print(f"warning: {step_dir} was written before checkpoint manifests: loading it "
              "unverified (damage in it goes undetected)", flush=True)
        problem = None
    problem = problem or _check_pickles(step_dir)
    if problem:
        raise ValueError(f"checkpoint {step_dir} is unusable: {problem}")


def _check_pickles(step_dir: str) -> str | None:
    """The dist-checkpoint metadata against the allow-list (torch unpickles it bare), and
    megatron's common.pt, if any, as weights only (megatron relies on torch's default)."""
    try:
        safe_unpickle.check_metadata(step_dir)
        common = os.path.join(step_dir, _COMMON)
        if os.path.isfile(common):
            safe_unpickle.load_torch_file(common)
    except safe_unpickle.UnsafeCheckpointError as error:
        return str(error)
    return None


_COMMON = "common.pt"  # megatron: dist_checkpointing/strategies/common.py COMMON_STATE_FNAME


def _is_step_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name))
               for name in ("meta.json", checkpoint_manifest.MANIFEST))


def _step_dirs(root: str) -> list[str]:
    """Published step directories under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    return sorted((d for d in os.listdir(root) if d.startswith("step_")
                   and not d.endswith(".partial") and os.path.isdir(os.path.join(root, d))),
                  reverse=True)


def read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None
