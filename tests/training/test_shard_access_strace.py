"""#24 seen from outside: `launch/torchrun.sh` under `strace -f`, every file a process opens,
grouped by process (threads joined to theirs from the clone calls). With DP=2 the second data
rank opens only the shards of its stream's range, half of them (rank 0 checks all of them
once); with TP=2 one process of the replica opens shards at all."""

import os
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

from tests.data.shard_factory import synthetic_dataset
from tests.training.test_img2dataset_training import train_command, write_shards

def _strace_works() -> bool:
    """strace installed and allowed to trace (a container without ptrace rights is not)."""
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"],
                          capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _strace_works(), reason="strace is missing or may not "
                                "trace here (.ci/run installs it)")

_CALL = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>")


def shards_opened_per_process(trace: str, folder: str) -> list[set[str]]:
    """Per process that opened any .tar in `folder`: the set of those it opened."""
    process_of: dict[int, int] = {}
    pending: dict[int, str] = {}  # tid -> the unfinished clone call's text
    opened: dict[int, set[str]] = defaultdict(set)
    with open(trace) as f:
        for line in f:
            match = _CALL.match(line.strip())
            if not match:
                continue
            tid, call = int(match.group(1)), match.group(2)
            if call.endswith("<unfinished ...>"):
                pending[tid] = call
                continue
            if _RESUMED.match(call):
                call = pending.pop(tid, "") + call
            if call.startswith(("clone", "vfork", "fork")):
                child = re.search(r"= (\d+)$", call)
                if child:
                    parent = process_of.get(tid, tid)
                    process_of[int(child.group(1))] = parent if "CLONE_THREAD" in call \
                        else int(child.group(1))
            elif call.startswith("openat") and not re.search(r"= -1", call):
                path = re.search(r'"([^"]+\.tar)"', call)
                if path and os.path.dirname(os.path.abspath(path.group(1))) == folder:
                    opened[process_of.get(tid, tid)].add(os.path.basename(path.group(1)))
    return [paths for paths in opened.values() if paths]


def traced_run(tmp_path, name: str, ranks: int, *sets: str) -> list[set[str]]:
    """8 training shards of 8 samples (and a validation set apart); the shard names each
    process opened."""
    tokenizer = synthetic_dataset().tokenizer_model
    train = write_shards(str(tmp_path / name), ("JPEG", "PNG", "WEBP", "WEBP"))  # 6 files
    for extra in ("extra-00000", "extra-00001"):
        shutil.copy(os.path.join(train, "jpeg-00000.tar"), os.path.join(train, extra + ".tar"))
    val = write_shards(str(tmp_path / f"{name}-val"), ("JPEG",))
    trace = str(tmp_path / f"{name}.strace")
    code, log = train_command(train, tokenizer, str(tmp_path / f"{name}-run"), ranks,
                              "train.steps=2", "train.warmup_steps=1",
                              f"data.val_shards={val}", *sets,
                              prefix=("strace", "-f", "-qq", "-o", trace, "-e",
                                      "trace=openat,clone,clone3,vfork,fork"))
    assert code == 0, log
    assert len([n for n in os.listdir(train) if n.endswith(".tar")]) == 8
    return shards_opened_per_process(trace, os.path.realpath(train))


def test_dp2_the_second_reader_opens_half_of_the_shards(tmp_path):
    readers = traced_run(tmp_path, "dp2", 2)
    # Rank 0 checks all 8 once (and reads its range); the other reader opens the 4 shards of
    # its range of 32 samples and nothing else.
    assert sorted(len(r) for r in readers) == [4, 8], readers


def test_tp2_one_process_of_the_replica_opens_shards(tmp_path):
    readers = traced_run(tmp_path, "tp2", 2, "parallel.tensor=2")
    assert [len(r) for r in readers] == [8], readers
