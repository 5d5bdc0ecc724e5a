"""Loading a checkpoint never runs code from it. A pickle whose __reduce__ calls os.system
("touch MARKER") is planted into each file kind a load reads: the per-rank state, the
dist-checkpoint `.metadata` (which torch unpickles bare), megatron's `common.pt`, a weight
shard; and the checkpoint is then resumed, used as `train.init_from`, or exported with
tools/convert_checkpoint.py. The manifest is rewritten to match each planted file, as a
sender of a hostile checkpoint would: the refusal must come from how the file is read, not
from a digest. Every load must fail naming the file, and the marker must never appear."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from tests.harness import DistributedFailure, run_distributed
from tests.training.test_resume import dataset_cache, tiny, train_rank  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Payload:
    """Unpickling this runs a shell command (the attack)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 2 steps with a checkpoint at step 2 (tiny model, one rank)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    run_distributed(train_rank, 1, args=(out, None, ["train.steps=2"]), timeout=300)
    return out


def copy_run(trained: str, tmp_path) -> tuple[str, str]:
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    return run, os.path.join(run, "checkpoints", "step_00000002")


def rewrite_manifest(step_dir: str) -> None:
    from ov2_megatron.training import checkpoint_manifest

    checkpoint_manifest.write(step_dir)


def plant(step_dir: str, name: str, marker: str, as_torch: bool) -> None:
    with open(os.path.join(step_dir, name), "wb") as f:
        if as_torch:
            torch.save({"optimizers": Payload(marker)}, f)
        else:
            pickle.dump(Payload(marker), f)
    rewrite_manifest(step_dir)


def assert_refused(error_text: str, name: str, marker: str) -> None:
    assert not os.path.exists(marker), "the planted pickle ran"
    assert name in error_text, error_text[-3000:]


@pytest.mark.parametrize("name, as_torch", [
    ("rank_00000.pt", True),  # torch.load of the optimizer/RNG/data state
    (".metadata", False),     # torch's FileSystemReader.read_metadata: pickle.load
    ("common.pt", True),      # megatron's load_common (torch.load)
])
def test_resume_refuses_planted_pickles(trained, tmp_path, name, as_torch):
    run, step_dir = copy_run(trained, tmp_path)
    marker = str(tmp_path / "MARKER")
    plant(step_dir, name, marker, as_torch)
    with pytest.raises(DistributedFailure) as error:
        run_distributed(train_rank, 1, args=(run, None, ["train.steps=3"]), timeout=300)
    assert_refused(str(error.value), name, marker)


def test_resume_never_unpickles_code_from_a_weight_shard(trained, tmp_path):
    run, step_dir = copy_run(trained, tmp_path)
    marker = str(tmp_path / "MARKER")
    shard = next(n for n in os.listdir(step_dir) if n.endswith(".distcp"))
    plant(step_dir, shard, marker, as_torch=True)
    with pytest.raises(DistributedFailure) as error:
        run_distributed(train_rank, 1, args=(run, None, ["train.steps=3"]), timeout=300)
    assert not os.path.exists(marker), "the planted pickle ran"
    assert "step_00000002" in str(error.value)


def test_init_from_refuses_planted_metadata(trained, tmp_path):
    stage1, step_dir = copy_run(trained, tmp_path)
    marker = str(tmp_path / "MARKER")
    plant(step_dir, ".metadata", marker, as_torch=False)
    stage2 = str(tmp_path / "stage2")
    with pytest.raises(DistributedFailure) as error:
        run_distributed(train_rank, 1, args=(stage2, None, ["train.steps=1",
                                                            f"train.init_from={stage1}"]),
                        timeout=300)
    assert_refused(str(error.value), ".metadata", marker)


def test_export_timm_refuses_planted_metadata(trained, tmp_path):
    run, step_dir = copy_run(trained, tmp_path)
    marker = str(tmp_path / "MARKER")
    plant(step_dir, ".metadata", marker, as_torch=False)
    done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "export-timm",
                           "--checkpoint", step_dir, "--output", str(tmp_path / "timm")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode != 0
    assert_refused(done.stdout + done.stderr, ".metadata", marker)
    assert "refusing to load posix.system" in done.stdout + done.stderr


def test_metadata_allow_list_accepts_what_torch_writes(trained):
    """The real metadata of this megatron/torch passes the allow-list unchanged."""
    from ov2_megatron.training import safe_unpickle

    safe_unpickle.check_metadata(os.path.join(trained, "checkpoints", "step_00000002"))
