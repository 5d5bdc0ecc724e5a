"""tools/prepare_shards.py and tools/train_tokenizer.py on existing img2dataset-style shards:
tar inputs, folders of tars, --caption-key, and one clear line for each user mistake."""

from __future__ import annotations

import importlib.util
import json
import os
import tarfile

import pytest

from ov2_megatron.data.shards import iter_shard
from tests.data.shard_factory import image_bytes, write_img2dataset_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture()
def json_shards(tmp_path):
    """Two shards: PNG and WebP images, captions only in .json (`re_caption`, a list)."""
    root = tmp_path / "img2dataset"
    os.makedirs(root)
    for s, (ext, fmt) in enumerate((("png", "PNG"), ("webp", "WEBP"))):
        write_img2dataset_shard(str(root / f"{s:05d}.tar"), [
            (f"{s}{i:04d}", {ext: image_bytes(i, fmt), "json": json.dumps(
                {"url": "u", "re_caption": [f"sample {s * 5 + i} good", "other"]}).encode()})
            for i in range(5)])
    return str(root)


def last_error_line(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    return errors[0], captured.out


def test_prepare_from_a_folder_of_tars_and_a_tar(json_shards, tmp_path, capsys):
    main = tool("prepare_shards")
    assert main(["--input", json_shards, "--output", str(tmp_path / "out"), "--workers", "1",
                 "--caption-key", "re_caption"]) == 0
    assert "written: 10 skipped: 0" in capsys.readouterr().out
    samples = list(iter_shard(str(tmp_path / "out" / "shard-000000.tar")))
    assert [s.caption for s in samples] == [f"sample {i} good" for i in range(10)]
    assert samples[0].meta["re_caption"] == ["sample 0 good", "other"]  # candidates kept
    assert samples[0].jpeg[:2] == b"\xff\xd8"  # re-encoded to the JPEG contract
    one = os.path.join(json_shards, "00001.tar")
    assert main(["--input", one, "--output", str(tmp_path / "one"), "--workers", "1",
                 "--caption-key", "re_caption"]) == 0
    assert "written: 5 skipped: 0" in capsys.readouterr().out


def test_prepare_mistakes_are_one_clear_line(json_shards, tmp_path, capsys):
    main = tool("prepare_shards")
    out = str(tmp_path / "out")
    assert main(["--input", json_shards, "--output", out, "--workers", "1"]) == 2
    line, _ = last_error_line(capsys)
    assert "00000.tar" in line and "no .txt caption" in line and "--caption-key" in line
    assert "re_caption" in line
    assert main(["--input", json_shards, "--output", out, "--caption-key", "caption"]) == 2
    line, _ = last_error_line(capsys)
    assert "no field 'caption'" in line and "00000.tar" in line
    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert main(["--input", str(empty), "--output", out]) == 2
    line, _ = last_error_line(capsys)
    assert str(empty) in line and "no .tar shards" in line
    odd = tmp_path / "data.zip"
    odd.write_bytes(b"PK")
    assert main(["--input", str(odd), "--output", out]) == 2
    line, _ = last_error_line(capsys)
    assert "data.zip" in line and "unknown type" in line and ".tar" in line
    broken = tmp_path / "broken"
    os.makedirs(broken)
    (broken / "x.tar").write_bytes(b"not a tar" * 100)
    assert main(["--input", str(broken), "--output", out]) == 2
    line, _ = last_error_line(capsys)
    assert "x.tar" in line and "not a readable tar" in line


def test_train_tokenizer_on_json_caption_shards(json_shards, tmp_path, capsys):
    main = tool("train_tokenizer")
    assert main(["--shards", json_shards, "--output", str(tmp_path / "tok"),
                 "--vocab-size", "40"]) == 2
    line, _ = last_error_line(capsys)
    assert "00000.tar" in line and "--caption-key" in line
    assert main(["--shards", json_shards, "--output", str(tmp_path / "tok"),
                 "--vocab-size", "40", "--caption-key", "re_caption"]) == 0
    assert os.path.isfile(tmp_path / "tok.model")
    assert main(["--shards", json_shards, "--output", str(tmp_path / "tok2"),
                 "--caption-key", "meta.caption"]) == 2
    line, _ = last_error_line(capsys)
    assert "no field 'meta.caption'" in line


def test_a_latin_1_caption_is_skipped_and_a_bom_dropped(tmp_path, capsys):
    """Shard input and folder input alike: a caption that is not UTF-8 is listed in the skip
    report as caption_not_utf8 (before, from a shard, it was written with U+FFFD in it); a
    UTF-8 caption with a byte-order mark is written without the mark (before: kept)."""
    captions = {"latin": "café crème".encode("latin-1"), "bom": "\ufeffa plain caption".encode(),
                "plain": b"another caption"}
    shard = write_img2dataset_shard(str(tmp_path / "00000.tar"), [
        (key, {"jpg": image_bytes(i, "JPEG"), "txt": text})
        for i, (key, text) in enumerate(captions.items())])
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (key, text) in enumerate(captions.items()):
        (folder / f"{key}.jpg").write_bytes(image_bytes(i, "JPEG"))
        (folder / f"{key}.txt").write_bytes(text)
    main = tool("prepare_shards")
    for name, source in (("shard", shard), ("folder", str(folder))):
        out = tmp_path / f"out-{name}"
        assert main(["--input", source, "--output", str(out), "--workers", "1"]) == 0
        assert "skipped caption_not_utf8: 1" in capsys.readouterr().out, name
        with open(out / "skipped.tsv", encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        assert [reason for _, reason in rows] == ["caption_not_utf8"], name
        assert "latin" in rows[0][0], name
        with tarfile.open(out / "shard-000000.tar") as tar:  # the stored bytes, not a reader's
            written = sorted(tar.extractfile(m).read() for m in tar if m.name.endswith(".txt"))
        assert written == [b"a plain caption", b"another caption"], name
