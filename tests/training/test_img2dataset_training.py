"""Training on shards as img2dataset writes them (issue #13): PNG, WebP, JPEG images with
captions only in a JSON field, each format alone and all mixed, and with upper-case
extensions (KEY.JPG, KEY.JPEG), through the real training loop; and a shard set whose every
sample is bad stops the run with an error naming the shards, in seconds."""

import contextlib
import io
import json
import os
import tarfile
import time

import pytest

from tests.data.shard_factory import image_bytes, synthetic_dataset, write_img2dataset_shard
from tests.harness import DistributedFailure, run_distributed

WORDS = ("red", "blue", "green", "circle", "square", "small", "large", "on", "a", "the")


def write_shards(root: str, formats: tuple[str, ...], with_caption: bool = True,
                 extension: dict | None = None) -> str:
    """Two shards per format of 8 samples each: KEY.{jpg|png|webp} + KEY.json (+ no .txt)."""
    os.makedirs(root)
    extension = extension or {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
    for f, fmt in enumerate(formats):
        for s in range(2):
            samples = []
            for i in range(8):
                seed = 100 * f + 10 * s + i
                meta = {"url": f"http://x/{seed}", "width": 48, "height": 40}
                if with_caption:
                    meta["re_caption"] = " ".join(WORDS[(seed + k) % len(WORDS)] for k in range(6))
                samples.append((f"{seed:09d}", {extension[fmt]: image_bytes(seed, fmt),
                                                "json": json.dumps(meta).encode()}))
            write_img2dataset_shard(os.path.join(root, f"{fmt.lower()}-{s:05d}.tar"), samples)
    return root


def train(shards: str, tokenizer: str, output_dir: str):
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training import loop
    from ov2_megatron.training.run_config import apply_overrides

    run = apply_overrides(get_recipe("tiny_cpu"), [
        f"data.train_shards={shards}", "data.caption_key=re_caption",
        f"data.tokenizer_model={tokenizer}", "model.vision.image_size=32", "data.resolution=32",
        f"train.output_dir={output_dir}", "train.steps=2", "train.warmup_steps=1",
        "train.global_batch=4", "train.micro_batch=2", "train.eval_batches=1",
        "train.num_generate=0", "data.num_threads=1", "data.bad_sample_window=64"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        summary = loop.train(run)
    return summary, out.getvalue() + err.getvalue()


def train_on_each(cases: dict, tokenizer: str, root: str) -> dict:
    return {name: train(shards, tokenizer, os.path.join(root, name))
            for name, shards in cases.items()}


def test_trains_on_png_webp_json_captions_mixed_and_upper_case_extensions(tmp_path):
    tokenizer = synthetic_dataset().tokenizer_model
    cases = {name: write_shards(str(tmp_path / name), formats) for name, formats in (
        ("png", ("PNG",)), ("webp", ("WEBP",)), ("mixed", ("JPEG", "PNG", "WEBP")))}
    # A camera's KEY.JPG / KEY.JPEG are images too (they were empty_image before).
    cases["upper-case"] = write_shards(str(tmp_path / "upper-case"), ("JPEG", "PNG"),
                                       extension={"JPEG": "JPG", "PNG": "JPEG"})
    results = run_distributed(train_on_each, 1, args=(cases, tokenizer, str(tmp_path / "runs")),
                              timeout=400)[0]
    for name, (summary, log) in results.items():
        assert summary["step"] == 2 and 0 < summary["val_loss"] < 20, (name, summary)
        with open(tmp_path / "runs" / name / "metrics.jsonl") as f:
            steps = [json.loads(line) for line in f if '"loss"' in line]
        assert [r["step"] for r in steps] == [1, 2], (name, steps)
        for record in steps:
            assert 0 < record["loss"] < 20, (name, record)
            assert not record.get("bad_samples"), (name, record)  # every sample was read


def train_command(shards: str, tokenizer: str, output_dir: str, ranks: int, *sets: str,
                  prefix: tuple[str, ...] = ()):
    """ov2-train through launch/torchrun.sh, as a user runs it: (return code, stdout+stderr).
    `prefix`: a command to run it under (strace)."""
    import subprocess

    from tests.slurm.jobs import REPO, launcher_env
    from tests.slurm.test_torchrun import _clean_env

    args = [*prefix, str(REPO / "launch" / "torchrun.sh"), str(ranks), "--recipe", "tiny_cpu"]
    for item in (f"data.train_shards={shards}", "data.caption_key=re_caption",
                 f"data.tokenizer_model={tokenizer}", "model.vision.image_size=32",
                 "data.resolution=32", f"train.output_dir={output_dir}", "train.global_batch=4",
                 "train.micro_batch=2", "train.num_generate=0", "train.linear_probe=false",
                 "train.eval_batches=1", "data.num_threads=1", *sets):
        args += ["--set", item]
    done = subprocess.run(args, env=_clean_env(**launcher_env(output_dir + "-cache")),
                          capture_output=True, text=True, timeout=240, start_new_session=True)
    return done.returncode, done.stdout + done.stderr


def test_a_cut_shard_is_named_and_training_reads_its_complete_samples(tmp_path):
    """An interrupted download (a shard cut inside its last image) next to whole shards, keys
    with spaces and upper-case extensions, through the command line: the run warns naming the
    cut shard and trains with 0 bad samples (it crashed in tarfile with a 53-line traceback
    naming no shard; spaced keys were dropped uncounted; .JPG was empty_image)."""
    tokenizer = synthetic_dataset().tokenizer_model
    # A camera's extensions too: JPEGs as KEY.JPG, PNGs named KEY.JPEG.
    shards = write_shards(str(tmp_path / "cut"), ("JPEG", "PNG"),
                          extension={"JPEG": "JPG", "PNG": "JPEG"})
    cut = os.path.join(shards, "jpeg-00001.tar")
    with tarfile.open(cut) as tar:
        last_image = [m for m in tar if m.name.endswith(".JPG")][-1]
    with open(cut, "r+b") as f:
        f.truncate(last_image.offset_data + 100)
    spaced = os.path.join(shards, "png-00000.tar")
    with tarfile.open(spaced) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(spaced, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            member.name = "my photo " + member.name
            tar.addfile(member, io.BytesIO(data))
    code, log = train_command(shards, tokenizer, str(tmp_path / "run"), 1, "train.steps=2",
                              "train.warmup_steps=1")
    assert code == 0, log
    assert f"shard {cut} is cut" in log and "7 complete sample(s)" in log, log
    assert "Traceback" not in log, log
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert not any(r.get("bad_samples") for r in records), records
    assert 0 < records[-1]["val_loss"] < 20, records[-1]


def test_a_fully_bad_shard_set_stops_with_the_shards_named_in_seconds(tmp_path):
    tokenizer = synthetic_dataset().tokenizer_model
    shards = write_shards(str(tmp_path / "no-captions"), ("JPEG",), with_caption=False)
    started = time.monotonic()
    with pytest.raises(DistributedFailure) as failure:
        run_distributed(train, 1, args=(shards, tokenizer, str(tmp_path / "run")), timeout=120)
    assert time.monotonic() - started < 30
    message = str(failure.value)
    assert "BadDataError" in message and "jpeg-0000" in message, message
    assert "caption_field_missing" in message or "no_caption" in message, message


def test_a_sample_without_image_or_txt_is_named_by_its_json(tmp_path):
    """Images under an extension the loader does not read (here .tif) and captions only in
    JSON: the bad samples are counted with their shard, named from the JSON entry (it was
    `<unknown shard>`: the missing image and .txt had no source)."""
    tokenizer = synthetic_dataset().tokenizer_model
    shards = write_shards(str(tmp_path / "tif"), ("JPEG",), extension={"JPEG": "tif"})
    with pytest.raises(DistributedFailure) as failure:
        run_distributed(train, 1, args=(shards, tokenizer, str(tmp_path / "run")), timeout=120)
    message = str(failure.value)
    assert "empty_image" in message and "jpeg-00000.tar" in message, message
    assert "<unknown shard>" not in message, message


def test_bad_data_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """Two ranks, one reading a shard without captions: before, that rank raised BadDataError
    with a traceback and the other waited in a collective until the process-group timeout.
    Now both stop at the same step, each with the same one line, exit code 3."""
    tokenizer = synthetic_dataset().tokenizer_model
    good = write_shards(str(tmp_path / "good"), ("JPEG",))
    bad = write_shards(str(tmp_path / "bad"), ("PNG",), with_caption=False)
    code, log = train_command(f"{good}/jpeg-00000.tar,{bad}/png-00000.tar", tokenizer,
                              str(tmp_path / "run"), 2, "train.steps=4",
                              "data.bad_sample_window=4",
                              f"data.val_shards={good}/jpeg-00001.tar")
    assert code != 0, log
    lines = [line for line in log.splitlines() if "ov2-train: stopped by the data:" in line]
    assert len(lines) == 2, log
    assert len({line.split("ov2-train:", 1)[1] for line in lines}) == 1, lines  # the same line
    assert "all of the last 4 samples were bad" in lines[0] and "png-00000.tar" in lines[0]
    # torchrun's agent still prints its own ChildFailedError; nothing of ours raises.
    assert not [line for line in log.splitlines() if "ov2_megatron" in line and 'File "' in line]
