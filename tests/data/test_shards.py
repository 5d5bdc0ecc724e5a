"""Shard writer (index identical to DALI's wds2idx) and prepare_shards on real broken files."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ov2_megatron.data.prepare import prepare_shards, read_manifest
from ov2_megatron.data.shards import Sample, ShardWriter, iter_shard, read_index
from tests.data.shard_factory import jpeg_bytes, png_bytes, truncated_jpeg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_writer_index_equals_wds2idx_and_round_trips(tmp_path):
    from wds2idx import IndexCreator

    samples = [Sample(f"k{i:03d}", jpeg_bytes(i), f"caption {i} é", {"i": i} if i % 2 else None)
               for i in range(7)]
    with ShardWriter(str(tmp_path), samples_per_shard=3) as writer:
        for sample in samples:
            writer.write(sample)
    assert [os.path.basename(p) for p in writer.shard_paths] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    for path in writer.shard_paths:
        reference = str(tmp_path / "reference.idx")
        with IndexCreator(path, reference, verbose=False) as creator:
            creator.create_index()
        assert open(path[:-4] + ".idx").read() == open(reference).read()
    back = [s for path in writer.shard_paths for s in iter_shard(path)]
    assert back == samples
    index = read_index(writer.shard_paths[0][:-4] + ".idx")
    with open(writer.shard_paths[0], "rb") as f:  # offsets point at the payloads
        ext, offset, size, name = index[1][0]
        f.seek(offset)
        assert (ext, name, f.read(size)) == ("jpg", "k001.jpg", samples[1].jpeg)


def test_writer_rejects_keys_with_dots(tmp_path):
    with pytest.raises(ValueError, match="key"):
        ShardWriter(str(tmp_path)).write(Sample("a.b", jpeg_bytes(0), "x"))


def _bad_folder(root) -> dict[str, str]:
    """Writes one good sample per index 0..5 and one of each bad kind; returns expected skips."""
    root.mkdir()
    for i in range(6):
        (root / f"good{i}.jpg").write_bytes(jpeg_bytes(i))
        (root / f"good{i}.txt").write_text(f"sample {i} good")
    big = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(big, format="JPEG")
    files = {
        "truncated.jpg": truncated_jpeg(10), "pngnamed.jpg": png_bytes(), "zero.jpg": b"",
        "nocaption.jpg": jpeg_bytes(11), "emptycap.jpg": jpeg_bytes(12),
        "latin1.jpg": jpeg_bytes(13), "oversized.jpg": big.getvalue(),
        "notimage.jpg": b"hello, I am text pretending to be an image" * 10,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "nocaption.jpg":
            (root / name.replace(".jpg", ".txt")).write_bytes(
                {"emptycap.jpg": b"  \n", "latin1.jpg": "café".encode("latin-1")}.get(
                    name, f"sample {name} caption".encode()))
    return {"truncated.jpg": "truncated", "zero.jpg": "empty_file",
            "nocaption.jpg": "missing_caption", "emptycap.jpg": "no_caption",
            "latin1.jpg": "caption_not_utf8", "oversized.jpg": "oversized",
            "notimage.jpg": "not_an_image"}


def test_prepare_folder_skips_every_bad_kind_and_is_idempotent(tmp_path):
    expected_skips = _bad_folder(tmp_path / "in")
    out = tmp_path / "out"
    report = prepare_shards(str(tmp_path / "in"), str(out), samples_per_shard=4,
                            max_image_pixels=250 * 250)
    assert dict(report.skipped) == expected_skips
    assert report.written == 7 and report.converted == 1  # 6 good + the PNG, re-encoded
    samples = [s for p in sorted(out.glob("shard-*.tar")) for s in iter_shard(str(p))]
    by_source = {s.meta["source"]: s for s in samples}
    assert set(by_source) == {f"good{i}.jpg" for i in range(6)} | {"pngnamed.jpg"}
    for i in range(6):  # valid JPEGs are kept byte for byte
        assert by_source[f"good{i}.jpg"].jpeg == jpeg_bytes(i)
        assert by_source[f"good{i}.jpg"].caption == f"sample {i} good"
    converted = Image.open(io.BytesIO(by_source["pngnamed.jpg"].jpeg))
    assert converted.format == "JPEG" and converted.size == (40, 30)
    lines = (out / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "source\treason" and len(lines) == 1 + len(expected_skips)
    manifest = read_manifest(str(out))
    assert manifest["written"] == 7 and manifest["skipped_by_reason"]["truncated"] == 1

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_shards(str(tmp_path / "in"), str(out), samples_per_shard=4,
                           max_image_pixels=250 * 250)
    assert again.up_to_date and again.written == 7 and len(again.skipped) == len(expected_skips)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    for name in ("good0", "good1", "good2", "good3", "good4"):  # changed input: stale shards go
        os.remove(tmp_path / "in" / f"{name}.jpg")
    third = prepare_shards(str(tmp_path / "in"), str(out), samples_per_shard=4,
                           max_image_pixels=250 * 250)
    assert not third.up_to_date and third.written == 2
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.idx", "shard-000000.tar"]


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_prepare_from_tables(tmp_path, kind):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        rows.append({"image_path": f"imgs/{i}.jpg", "caption": f"sample {i}, with a comma"})
    rows.append({"image_path": "imgs/absent.jpg", "caption": "sample 98"})
    rows.append({"image_path": "https://example.com/x.jpg", "caption": "sample 99"})
    rows.append({"image_path": "imgs/0.jpg", "caption": ""})
    table = tmp_path / f"table.{kind}"
    if kind in ("csv", "tsv"):
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image_path", "caption"],
                                    delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        table.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), table)
    report = prepare_shards(str(table), str(tmp_path / "out"), samples_per_shard=100)
    assert report.written == 5
    assert sorted(r for _, r in report.skipped) == ["missing_image", "no_caption",
                                                    "url_not_supported"]
    captions = [s.caption for s in iter_shard(str(tmp_path / "out" / "shard-000000.tar"))]
    assert captions == [f"sample {i}, with a comma" for i in range(5)]


def test_prepare_cli_last_line_and_exit_codes(tmp_path):
    expected_skips = _bad_folder(tmp_path / "in")
    tool = os.path.join(REPO, "tools", "prepare_shards.py")
    run = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "in"),
                          "--output", str(tmp_path / "out"), "--samples-per-shard", "3",
                          "--workers", "2", "--max-image-pixels", "62500"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"written: 7 skipped: {len(expected_skips)}"
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 3
    (tmp_path / "bad_only").mkdir()
    (tmp_path / "bad_only" / "a.jpg").write_bytes(b"")
    (tmp_path / "bad_only" / "a.txt").write_text("x")
    run = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "bad_only"),
                          "--output", str(tmp_path / "out2")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout.strip().splitlines()[-1] == "written: 0 skipped: 1"


def test_image_extensions_match_in_any_letter_case(tmp_path):
    """KEY.JPG / KEY.Jpeg (cameras, some exporters) are images for every reader: DALI's
    webdataset reader matches `ext` exactly, so it gets every spelling; the tar readers
    (tokenizer training, --resize) compare lower-cased."""
    import tarfile

    from ov2_megatron.data.config import every_letter_case
    from ov2_megatron.data.resize_shards import ResizeSettings, resize_sample

    spellings = every_letter_case(("jpg", "png"))
    assert len(spellings) == 16 and {"jpg", "JPG", "jPg", "PNG", "pnG"} <= set(spellings)
    assert spellings.index("JPG") < spellings.index("png")  # the first extension still wins
    path = str(tmp_path / "camera.tar")
    with tarfile.open(path, "w") as tar:
        for key, ext in (("a", "JPG"), ("b", "Jpeg")):
            for name, data in ((f"{key}.{ext}", jpeg_bytes(1)), (f"{key}.txt", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(iter_shard(path))
    assert [(s.key, len(s.jpeg) > 0, s.caption) for s in samples] == [
        ("a", True, "a photo"), ("b", True, "a photo")]
    members, reason, _ = resize_sample([("b.Jpeg", jpeg_bytes(1, (400, 300))),
                                        ("b.txt", b"a photo")], ResizeSettings(short_side=96))
    assert reason == "" and members[0][0] == "b.jpg" and members[1] == ("b.txt", b"a photo")
