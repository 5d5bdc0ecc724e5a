"""One image pipeline per replica (#24 item 2): only TP rank 0 of pipeline stage 0 builds
data loaders (training and validation); its TP peers get the images by broadcast, every
stage the tokens. Through the real training loop and DALI loader on CPU, TP=2, PP=2 and
TP=2 x PP=2 train with the losses and the validation loss of the single-rank run (the
batches are the same samples, so only the layouts' reduction order differs), and the
loaders built are counted per rank."""

import json
import os

import pytest

from tests.harness import run_distributed
from tests.training.test_resume import STEPS, tiny


def train_counting_loaders(output_dir: str, extra: list[str]) -> dict:
    from megatron.core import parallel_state

    from ov2_megatron.data import dali_pipeline
    from ov2_megatron.training import loop, step

    built = []
    original = dali_pipeline.ImageCaptionLoader.__init__

    def counting(self, *args, **kwargs):
        built.append("train" if kwargs.get("training", True) else "eval")
        original(self, *args, **kwargs)

    dali_pipeline.ImageCaptionLoader.__init__ = counting
    mapped = set()  # what the kernel says this process reads shards with, during training
    original_step = step.BatchStream.step_batches

    def step_batches(self, index):
        with open("/proc/self/maps") as f:
            mapped.update(line.split()[-1] for line in f if line.rstrip().endswith(".tar"))
        return original_step(self, index)

    step.BatchStream.step_batches = step_batches
    summary = loop.train(tiny(output_dir, extra))
    return dict(tp=parallel_state.get_tensor_model_parallel_rank(),
                pp=parallel_state.get_pipeline_model_parallel_rank(), loaders=sorted(set(built)),
                val_loss=summary["val_loss"], mapped_shards=len(mapped))


def losses(output_dir: str) -> list[float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module", autouse=True)
def dataset_cache(tmp_path_factory):
    os.environ["OV2_CACHE"] = str(tmp_path_factory.mktemp("ov2cache"))
    yield


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[list[float], float]:
    out = str(tmp_path_factory.mktemp("single"))
    result = run_distributed(train_counting_loaders, 1, args=(out, []), timeout=300)[0]
    return losses(out), result["val_loss"]


@pytest.mark.parametrize("world,layout", [
    (2, ["parallel.tensor=2"]),
    (2, ["parallel.pipeline=2"]),
    (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
])
def test_only_the_replicas_first_rank_reads_and_losses_are_the_single_ranks(
        single, tmp_path, world, layout):
    ranks = run_distributed(train_counting_loaders, world, args=(str(tmp_path), layout),
                            timeout=300)
    # Training and validation loaders, built by the replica's first rank only.
    assert [(r["tp"], r["pp"], r["loaders"]) for r in ranks if r["loaders"]] == [
        (0, 0, ["eval", "train"])]
    # DALI memory-maps the shards it reads: only the reader's process has any mapped.
    assert [(r["tp"], r["pp"]) for r in ranks if r["mapped_shards"]] == [(0, 0)]
    want_losses, want_val = single
    got = losses(str(tmp_path))
    assert len(got) == len(want_losses) == STEPS
    assert got == pytest.approx(want_losses, rel=2e-5, abs=0), (got, want_losses)
    assert ranks[0]["val_loss"] == pytest.approx(want_val, rel=2e-5, abs=0)


def train_recording_shard_access(output_dir: str) -> dict:
    """loop.train on this rank; the training shards it opened from Python (checks, indexes)
    and the ones DALI memory-mapped, during the run."""
    import builtins

    from ov2_megatron.training import loop, step

    opened, mapped = set(), set()
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, str) and file.endswith(".tar"):
            opened.add(os.path.abspath(file))
        return real_open(file, *args, **kwargs)

    original_step = step.BatchStream.step_batches

    def step_batches(self, index):
        with real_open("/proc/self/maps") as f:
            mapped.update(line.split()[-1] for line in f if line.rstrip().endswith(".tar"))
        return original_step(self, index)

    run = tiny(output_dir)
    run.synthetic["samples_per_shard"] = 32  # 8 training shards of 32
    builtins.open = recording_open
    step.BatchStream.step_batches = step_batches
    try:
        loop.train(run)
    finally:
        builtins.open = real_open
    return dict(opened=sorted(opened), mapped=sorted(mapped))


def test_at_dp2_a_reader_touches_only_its_half_of_the_shards(tmp_path):
    """#24: rank 0 checks and indexes every shard once (the shard table); the other reader
    opens and maps only the shards of its stream's range: about half of them at DP=2."""
    ranks = run_distributed(train_recording_shard_access, 2, args=(str(tmp_path),), timeout=300)
    first, second = ({p for p in r["opened"] + r["mapped"] if "-per32/train/" in p}
                     for r in ranks)
    assert len(first) == 8, sorted(first)  # rank 0 checked every training shard
    # A range of 128 samples starts and ends on shard boundaries here: exactly 4 shards.
    assert len(second) == 4 and second < first, sorted(second)
