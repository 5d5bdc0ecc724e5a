"""tools/prepare_shards.py --resize: the stage-1 copy of existing shards, on real tars and real
PIL images; the DALI loader reads the copy; a run killed with SIGKILL resumes where it was."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from ov2_megatron.data.resize_shards import ResizeSettings, iter_members, resize_shards
from ov2_megatron.data.shard_index import build_index
from ov2_megatron.data.shards import read_index
from tests.data.shard_factory import (image_bytes, jpeg_bytes, truncated_jpeg,
                                      write_img2dataset_shard)
from tests.data.test_shard_inputs import last_error_line, tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIDE = 48
# Hand-written JSON (spaces, unsorted keys, non-ASCII) that any re-serialisation would change.
META = '{"z": 1,  "caption":"a b", "ü": [1, 2]}'.encode()


def sample_members(s: int, i: int) -> dict[str, bytes]:
    """Per position: a landscape JPEG, a portrait JPEG, a PNG, a small JPEG (kept as is)."""
    image = {0: ("jpg", jpeg_bytes(i, (160, 96))), 1: ("jpg", jpeg_bytes(i, (90, 150))),
             2: ("png", image_bytes(i, "PNG", (120, 80))), 3: ("jpg", jpeg_bytes(i, (40, 30)))}
    ext, data = image[i % 4]
    return {ext: data, "txt": f"sample {s * 100 + i} good".encode(), "json": META, "cls": b"7"}


def write_inputs(root: str, shards: int = 3, per_shard: int = 6) -> list[str]:
    """Shards of good samples plus, in each, one truncated image and one without an image."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for s in range(shards):
        samples = [(f"{s}{i:04d}", sample_members(s, i)) for i in range(per_shard)]
        samples.insert(2, (f"{s}bad", {"jpg": truncated_jpeg(s), "txt": b"cut"}))
        samples.append((f"{s}noimage", {"txt": b"no image", "json": META}))
        paths.append(write_img2dataset_shard(os.path.join(root, f"{s:05d}.tar"), samples))
    return paths


def shard_files(out_dir: str) -> dict[str, bytes]:
    return {name: open(os.path.join(out_dir, name), "rb").read()
            for name in sorted(os.listdir(out_dir)) if name.endswith((".tar", ".idx"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("resize-in") / "shards")
    write_inputs(root)
    return root


@pytest.fixture(scope="module")
def resized(inputs, tmp_path_factory) -> tuple[str, object]:
    out = str(tmp_path_factory.mktemp("resize-out") / "small")
    return out, resize_shards(inputs, out, ResizeSettings(SIDE), workers=1)


def test_keys_captions_and_json_survive_byte_for_byte(inputs, resized):
    out, report = resized
    assert report.skipped() == {"truncated_image": 3, "missing_image": 3}
    assert [s.name for s in report.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert report.total("resized") == 3 * 5 and report.total("kept_small") == 3
    for shard in report.shards:
        source = dict(iter_members(os.path.join(inputs, shard.name)))
        copy = list(iter_members(os.path.join(out, shard.name)))
        good = [key for key in source if not key.endswith(("bad", "noimage"))]
        assert [key for key, _ in copy] == good  # keys and their order
        for key, members in copy:
            original = {name.split(".", 1)[1]: data for name, data in source[key]}
            got = {name.split(".", 1)[1]: data for name, data in members}
            assert set(got) == {"jpg", "txt", "json", "cls"}  # the PNG is now KEY.jpg
            assert all(got[ext] == original[ext] for ext in ("txt", "json", "cls"))
            assert got["json"] == META
        index = read_index(os.path.join(out, shard.name[:-4] + ".idx"))
        assert [" ".join(f"{e} {o} {n} {m}" for e, o, n, m in sample) for sample in index] == \
            build_index(os.path.join(out, shard.name))


def test_shorter_side_is_resized_never_upscaled(inputs, resized):
    out, _ = resized
    source = dict(iter_members(os.path.join(inputs, "00001.tar")))
    for key, members in iter_members(os.path.join(out, "00001.tar")):
        name, data = next((n, d) for n, d in members if n.endswith(".jpg"))
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB"
        w, h = Image.open(io.BytesIO(source[key][0][1])).size
        if min(w, h) <= SIDE:  # 40x30: the original bytes, not upscaled
            assert data == source[key][0][1] and image.size == (w, h)
        else:
            assert min(image.size) == SIDE
            assert abs(image.size[0] / image.size[1] - w / h) < 0.02  # aspect kept


def test_rerun_reuses_and_changed_settings_rewrite(inputs, resized):
    out, _ = resized
    before = shard_files(out)
    brace = os.path.join(inputs, "{00000..00002}.tar")  # webdataset's spelling of the set
    again = resize_shards(brace, out, ResizeSettings(SIDE), workers=1)
    assert all(s.reused for s in again.shards) and shard_files(out) == before
    assert again.skipped() == {"truncated_image": 3, "missing_image": 3}  # from the records
    other = str(os.path.join(os.path.dirname(out), "q70"))
    lower = resize_shards(inputs, other, ResizeSettings(SIDE, quality=70), workers=1)
    assert not any(s.reused for s in lower.shards)
    rewritten = resize_shards(inputs, out, ResizeSettings(SIDE, quality=70), workers=1)
    assert not any(s.reused for s in rewritten.shards) and shard_files(out) == shard_files(other)


def test_the_dali_loader_reads_the_copy(resized, tmp_path):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
    from ov2_megatron.data.config import DataConfig
    from ov2_megatron.data.dali_pipeline import ImageCaptionLoader
    from ov2_megatron.data.tokenizer import train_tokenizer

    out, _ = resized
    tokenizer = train_tokenizer([f"sample {i} good" for i in range(300)],
                                str(tmp_path / "tok"), 48)
    config = DataConfig(train_shards=out, val_shards=out, tokenizer_model=tokenizer,
                        resolution=32, caption_length=16, num_threads=1)
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=6, training=False,
                                device="cpu")
    captions = [c for batch in loader for c in batch["captions"]]
    assert sorted(captions) == sorted(f"sample {s * 100 + i} good"
                                      for s in range(3) for i in range(6))
    assert loader.stats() == {} and loader.totals()["dropped"] == 0  # no bad sample left


def test_user_mistakes_are_one_line_and_exit_2(inputs, tmp_path, capsys):
    main = tool("prepare_shards")
    cases = [(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
              "does not exist"),
             (["--input", inputs, "--output", inputs], "holds the input shard"),
             (["--input", inputs, "--output", str(tmp_path / "o"), "--resize", "8"],
              "too small: use >= 16"),
             (["--input", inputs, "--output", str(tmp_path / "o"), "--caption-key", "x"],
              "--caption-key does not apply with --resize")]
    for args, message in cases:
        args = args if "--resize" in args else args + ["--resize", "64"]
        assert main(args) == 2
        line, _ = last_error_line(capsys)
        assert message in line, line


def run_tool(inputs: str, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "prepare_shards.py"),
                             "--resize", str(SIDE), "--input", inputs, "--output", out, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_keeps_complete_shards(tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, shards=4, per_shard=24)  # later shards take long enough to kill in
    out = str(tmp_path / "out")
    proc = run_tool(inputs, out, "--workers", "1")
    first = os.path.join(out, "00000.tar")
    deadline = time.monotonic() + 60
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = {name: os.stat(os.path.join(out, name)) for name in os.listdir(out)
            if name.endswith(".tar")}
    assert "00000.tar" in done and len(done) < 4, sorted(os.listdir(out))
    rerun = run_tool(inputs, out, "--workers", "2")
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert f"({len(done)} complete from an earlier run)" in stdout
    for name, st in done.items():  # not rewritten
        now = os.stat(os.path.join(out, name))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    whole = str(tmp_path / "whole")
    resize_shards(inputs, whole, ResizeSettings(SIDE), workers=1)
    assert shard_files(out) == shard_files(whole) and len(shard_files(out)) == 8


def test_a_recipe_names_each_stage_its_shards():
    from ov2_megatron.recipes import ShardSets, get_recipe, vit_1b, vit_l14

    sets = ShardSets(stage1="/data/s-128", stage2="/data/s", val="/data/val")
    assert vit_l14(1, sets).data.train_shards == "/data/s-128"
    assert vit_1b(2, sets).data.train_shards == "/data/s"
    assert vit_l14(2, sets).data.val_shards == "/data/val"
    assert vit_l14(1, ShardSets(stage2="/data/s")).data.train_shards == "/data/s"
    assert get_recipe("vit_l14", 1).data.train_shards == ""  # unchanged: --set names them
