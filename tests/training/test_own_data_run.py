"""Own shards through the real training loop: no synthetic set is built, validation runs on a
held-out training shard (said in the log), the synthetic-label probe stays off; and an
evaluation set split unevenly over data-parallel ranks runs the same batch count on each."""

import contextlib
import io
import json
import os

from tests.data.shard_factory import jpeg_bytes, synthetic_dataset, write_raw_shard
from tests.harness import run_distributed


def train_on_own_shards(data, output_dir: str, cache: str):
    os.environ["OV2_CACHE"] = cache
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training import loop
    from ov2_megatron.training.run_config import apply_overrides

    run = apply_overrides(get_recipe("tiny_cpu"), [
        f"data.train_shards={data.train_dir}", f"data.tokenizer_model={data.tokenizer_model}",
        "model.vision.image_size=32", "data.resolution=32", f"train.output_dir={output_dir}",
        "train.steps=2", "train.warmup_steps=1", "train.global_batch=4", "train.micro_batch=2",
        "train.eval_batches=1", "train.num_generate=0", "data.num_threads=1"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = loop.train(run)
    return summary, out.getvalue()


def test_own_shards_train_and_validate_without_the_synthetic_set(tmp_path):
    data = synthetic_dataset()
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cache.mkdir()
    summary, log = run_distributed(train_on_own_shards, 1,
                                   args=(data, str(run_dir), str(cache)), timeout=300)[0]
    assert os.listdir(cache) == []  # no synthetic set built
    assert "the synthetic set is not built" in log
    assert "validation: held out the last training shard" in log
    assert "linear probe: off" in log
    assert "warmup 1 steps (train.warmup_steps)" in log
    assert summary["step"] == 2 and summary["val_loss"] > 0
    assert not any(key.startswith("probe_") for key in summary)
    with open(run_dir / "config.json") as f:
        config = json.load(f)
    assert config["synthetic"] == {} and config["train"]["linear_probe"] is False
    assert config["data"]["val_shards"].endswith(".tar")
    assert config["data"]["val_shards"] not in config["data"]["train_shards"]


def uneven_eval_batches(val_shard: str, tokenizer: str) -> int:
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training import evaluate
    from ov2_megatron.training.run_config import apply_overrides

    initialize(ParallelLayout(), seed=0)
    run = apply_overrides(get_recipe("tiny_cpu"), [
        f"data.train_shards={val_shard}", f"data.val_shards={val_shard}",
        f"data.tokenizer_model={tokenizer}", "model.vision.image_size=32", "data.resolution=32",
        "train.micro_batch=1", "data.num_threads=1"])
    return len(evaluate._eval_batches(run, run.data.val_shards, limit=8))


def test_an_uneven_evaluation_split_runs_the_same_batch_count_on_every_rank(tmp_path):
    data = synthetic_dataset()
    shard = write_raw_shard(str(tmp_path / "val-000000.tar"), [
        (f"s{i}", {"jpg": jpeg_bytes(i), "txt": f"sample {i}".encode()}) for i in range(3)])
    # 3 samples over 2 ranks: DALI gives one rank 2 batches of 1, the other 1.
    counts = run_distributed(uneven_eval_batches, 2, args=(shard, data.tokenizer_model),
                             timeout=300)
    assert counts == [1, 1]
