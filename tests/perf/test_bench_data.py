"""tools/bench.py --data loader on the user's own shards (issue 23, item 5): the benchmark
reads the shards and tokenizer it is given (the vocabulary follows the tokenizer, as in a
run; it crashed on a 200-piece tokenizer), says which data it measured, and refuses bad input
in one line instead of a traceback."""

import os
import re
import subprocess
import sys

import pytest

from ov2_megatron.data.synthetic import ensure_synthetic_dataset
from tests.data.shard_factory import session_dir
from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def own_shards():
    """4 shards of 12 samples and a tokenizer of 200 pieces (tiny_cpu's model has 128)."""
    return ensure_synthetic_dataset(session_dir(), 48, 12, 32, seed=5, vocab_size=200,
                                    samples_per_shard=12)


def _own(shards) -> list[str]:
    return [f"data.train_shards={shards.train_dir}",
            f"data.tokenizer_model={shards.tokenizer_model}", "train.global_batch=8",
            "train.micro_batch=4", "data.num_threads=1"]


def bench_own_shards(overrides: list[str], cache: str) -> dict:
    from ov2_megatron.perf.benchmark import run_benchmark
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.run_config import apply_overrides

    os.environ["OV2_CACHE"] = cache  # where a synthetic set would be built
    run = apply_overrides(get_recipe("tiny_cpu"), overrides)
    return run_benchmark(run, steps=1, warmup=0, data=None)  # None: bench.py's default


def test_loader_benchmark_measures_the_named_shards(own_shards, tmp_path, monkeypatch, capsys):
    from ov2_megatron.train import main

    result = run_distributed(bench_own_shards, 1, args=(_own(own_shards), str(tmp_path)),
                             timeout=240)[0]
    assert result["data"] == "loader"
    assert result["data_source"] == (
        f"the DALI loader on data.train_shards {own_shards.train_dir} (3 shards read; the "
        "last is held out for validation, as a run does)")
    assert os.listdir(tmp_path) == []  # no synthetic set built
    # The model has the 200-piece vocabulary (padded to 256), as the dry run counts it.
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--recipe", "tiny_cpu", "--dry-run",
                 *[a for o in _own(own_shards) for a in ("--set", o)]]) == 0
    total = re.search(r"parameters: .* total ([\d,]+)", capsys.readouterr().out).group(1)
    rank = result["per_rank_memory_gib"][0]
    assert rank["parameters"] == int(total.replace(",", "")) == rank["predicted_parameters"]


def _bench(recipe: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"),
                           "--recipe", recipe, "--steps", "1", *args], capture_output=True,
                          text=True, timeout=120, cwd=str(cwd))


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    missing = _bench("tiny_cpu", "--data", "loader",
                     "--set", f"data.train_shards={tmp_path}/none-*.tar", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        f"bench.py: shard glob {tmp_path}/none-*.tar matched no files: check the path")
    no_data = _bench("vit_l14", "--data", "loader", cwd=tmp_path)
    assert no_data.returncode == 2 and "Traceback" not in no_data.stderr
    assert ("bench.py: --data loader: recipe vit_l14 has no synthetic set and "
            "data.train_shards is empty") in no_data.stderr
