"""Damaged, incomplete or poisoned checkpoints are named and never load silently:
- every step directory carries manifest.json (sizes, sha256), written before it is published;
- flipped bytes in a rank file or a weight shard, a truncated file, a missing file: `latest`
  is refused in one line and the newest checkpoint that verifies is used, saying so;
- a deleted `latest` with step directories present resumes from the newest that verifies;
- a rank file without optimizer moments, or with NaN in them, is refused naming the tensor;
- a full disk during a save fails with "no space left on device" naming the directory, which
  is removed, and `latest` stays on the previous checkpoint (the write fails inside
  megatron's own writer, or in the rank-file write).
"""

import errno
import json
import os
import shutil

import pytest
import torch

from tests.harness import DistributedFailure, run_distributed
from tests.training.test_resume import dataset_cache, train_rank  # noqa: F401 (fixture)

STEP2, STEP4 = "step_00000002", "step_00000004"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4 (tiny model, one rank)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    run_distributed(train_rank, 1, args=(out,), timeout=300)
    return out


def copy_run(trained: str, tmp_path) -> tuple[str, str]:
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    return run, os.path.join(run, "checkpoints")


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def shard_of(step_dir: str) -> str:
    return os.path.join(step_dir, next(n for n in sorted(os.listdir(step_dir))
                                       if n.endswith(".distcp")))


def test_manifest_lists_every_file_and_rank_files_load_as_weights_only(trained):
    step_dir = os.path.join(trained, "checkpoints", STEP4)
    with open(os.path.join(step_dir, "manifest.json")) as f:
        manifest = json.load(f)
    on_disk = {os.path.relpath(os.path.join(d, n), step_dir)
               for d, _, names in os.walk(step_dir) for n in names} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and "rank_00000.pt" in on_disk
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    state = torch.load(os.path.join(step_dir, "rank_00000.pt"), weights_only=True)
    assert state["optimizers"][0]["torch"]["state"]


@pytest.mark.parametrize("damage", ["rank file", "weight shard", "truncated", "missing meta"])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(trained, tmp_path, capsys, damage):
    from ov2_megatron.training import checkpoint

    run, root = copy_run(trained, tmp_path)
    step4 = os.path.join(root, STEP4)
    if damage == "rank file":
        flip_byte(os.path.join(step4, "rank_00000.pt"))
    elif damage == "weight shard":
        flip_byte(shard_of(step4))
    elif damage == "truncated":
        with open(shard_of(step4), "r+b") as f:
            f.truncate(100)
    else:
        os.remove(os.path.join(step4, "meta.json"))
    assert checkpoint.resolve(run) == os.path.join(root, STEP2)
    out = capsys.readouterr().out
    assert f"checkpoint {step4} is unusable" in out
    assert f"falling back to {os.path.join(root, STEP2)}" in out


def test_a_step_dir_named_directly_must_verify(trained, tmp_path):
    from ov2_megatron.conversion import ConversionError, megatron_checkpoint

    run, root = copy_run(trained, tmp_path)
    shard = shard_of(os.path.join(root, STEP4))
    flip_byte(shard)
    with pytest.raises(ConversionError, match=f"{shard} does not match its sha256"):
        megatron_checkpoint.locate(os.path.join(root, STEP4))


def test_no_verifying_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path):
    from ov2_megatron.training import checkpoint

    run, root = copy_run(trained, tmp_path)
    for step in (STEP2, STEP4):
        flip_byte(os.path.join(root, step, "rank_00000.pt"))
    with pytest.raises(ValueError, match=f"no checkpoint in {root} verifies"):
        checkpoint.resolve(run)


def test_checkpoint_without_manifest_loads_unverified(trained, tmp_path, capsys):
    from ov2_megatron.training import checkpoint

    run, root = copy_run(trained, tmp_path)
    os.remove(os.path.join(root, STEP4, "manifest.json"))
    assert checkpoint.resolve(run) == os.path.join(root, STEP4)
    assert "loading it unverified" in capsys.readouterr().out


def test_damaged_rank_file_resumes_from_previous_checkpoint(trained, tmp_path):
    run, root = copy_run(trained, tmp_path)
    flip_byte(os.path.join(root, STEP4, "rank_00000.pt"))
    result = run_distributed(train_rank, 1, args=(run,), timeout=300)[0]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    # 3 and 4 retrained from 2, and logged once: the records past the checkpoint it resumed
    # from are dropped (they were logged twice before, #23)
    assert result["step"] == 4 and steps == [1, 2, 3, 4]
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == STEP4


def test_deleted_latest_resumes_from_newest_step_dir(trained, tmp_path, capsys):
    from ov2_megatron.training import checkpoint

    run, root = copy_run(trained, tmp_path)
    os.remove(os.path.join(root, "latest"))
    assert checkpoint.resolve(run) == os.path.join(root, STEP4)
    assert "`latest` is missing" in capsys.readouterr().out
    result = run_distributed(train_rank, 1, args=(run, None, ["train.steps=5"]), timeout=300)[0]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert result["step"] == 5 and steps == [1, 2, 3, 4, 5]  # continued, not restarted


def poison_rank_file(step_dir: str, how: str) -> None:
    from ov2_megatron.training import checkpoint_manifest

    path = os.path.join(step_dir, "rank_00000.pt")
    state = torch.load(path, weights_only=True)
    torch_state = state["optimizers"][0]["torch"]
    if how == "no moments":
        torch_state["state"] = {}
    else:
        first = next(iter(torch_state["state"].values()))
        first["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)
    checkpoint_manifest.write(step_dir)  # as written so by a bug, not damaged on disk


@pytest.mark.parametrize("how, message", [("no moments", "has no moments for"),
                                          ("nan", "exp_avg .* holds non-finite values")])
def test_rank_file_with_bad_optimizer_state_is_refused(trained, tmp_path, how, message):
    run, root = copy_run(trained, tmp_path)
    poison_rank_file(os.path.join(root, STEP4), how)
    with pytest.raises(DistributedFailure, match=message):
        run_distributed(train_rank, 1, args=(run, None, ["train.steps=5"]), timeout=300)


def train_on_full_disk(output_dir: str, failing_file: str):
    """Every write to `failing_file` in the step-4 staging directory raises ENOSPC, in this
    rank and in megatron's writer processes (forked: they inherit the patched open)."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        name = str(file)
        if f"{STEP4}.partial" in name and "w" in mode and name.endswith(failing_file):
            return FullDisk(handle)
        return handle

    builtins.open = open_on_full_disk
    return train_rank(output_dir)


@pytest.mark.parametrize("failing_file", [".distcp", "rank_00000.pt.tmp"])
def test_full_disk_during_save_names_it_and_keeps_latest(tmp_path, failing_file):
    run = str(tmp_path / "run")
    with pytest.raises(DistributedFailure) as error:
        run_distributed(train_on_full_disk, 1, args=(run, failing_file), timeout=300)
    root = os.path.join(run, "checkpoints")
    assert f"no space left on device while saving checkpoint {root}/{STEP4}.partial" \
        in str(error.value)
    assert sorted(os.listdir(root)) == ["latest", STEP2]  # the partial directory is gone
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == STEP2
