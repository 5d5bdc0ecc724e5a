"""The data CLIs as a user runs them (subprocesses, real files)."""

import os
import re
import subprocess
import sys

from ov2_megatron.data.tokenizer import CaptionTokenizer
from tests.data.shard_factory import synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                          capture_output=True, text=True, timeout=180, cwd="/")


def test_train_tokenizer_cli(tmp_path):
    data = synthetic_dataset()
    run = run_tool("train_tokenizer.py", "--shards", data.train_dir,
                   "--output", str(tmp_path / "cap"), "--vocab-size", "100")
    assert run.returncode == 0, run.stderr
    tokenizer = CaptionTokenizer.from_file(str(tmp_path / "cap.model"))
    assert tokenizer.vocab_size == 100 and "the model pads it to 1024" in run.stdout
    caption = "two shapes on a gray background: a small red circle at the top and a large " \
              "blue square in the center."
    assert tokenizer.decode(tokenizer.encode_batch([caption], 64)[0]) == caption
    missing = run_tool("train_tokenizer.py", "--shards", str(tmp_path / "none-*.tar"),
                       "--output", str(tmp_path / "x"))
    assert missing.returncode == 2 and "matched no files" in missing.stderr


def test_bench_data_cli_prints_the_ratios_last():
    data = synthetic_dataset()
    run = run_tool("bench_data.py", "--shards", data.train_dir, "--resolution", "32",
                   "--threads", "2", "--batch-size", "8", "--batches", "3", "--warmup", "1",
                   "--rounds", "1")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup vs torch DataLoader: \d+\.\d\dx", lines[-1]), lines
    rate = r": ([\d.]+) images/s"
    jittered = float(re.search(r"dali \(cpu decoding, colour jitter 0.4 p 0.8, grayscale p "
                               r"0.2\)" + rate, run.stdout).group(1))
    plain = float(re.search(r"dali \(cpu decoding, no colour ops\)" + rate,
                            run.stdout).group(1))
    torch_rate = float(re.search(r"torch DataLoader .*no colour ops\)" + rate,
                                 run.stdout).group(1))
    assert jittered > 0 and plain > 0 and torch_rate > 0
    for line, ratio in ((lines[-1], plain / torch_rate), (lines[-2], jittered / plain)):
        printed = float(re.search(r"(\d+\.\d\d)x", line).group(1))
        assert abs(printed - ratio) <= 0.005 + 0.01 * ratio, (line, ratio)  # rounding only
    assert lines[-2].startswith("colour augmentation cost: ")
    assert re.search(r"CPU efficiency vs torch DataLoader: \d+\.\d\dx", run.stdout)


def test_make_synthetic_cli(tmp_path):
    run = run_tool("make_synthetic.py", "--cache-dir", str(tmp_path), "--num-train", "20",
                   "--num-val", "5", "--image-size", "32")
    assert run.returncode == 0, run.stderr
    train = run.stdout.splitlines()[0].split(": ", 1)[1]
    assert sorted(os.listdir(train)) == ["manifest.json", "shard-000000.idx", "shard-000000.tar",
                                         "skipped.tsv"]
