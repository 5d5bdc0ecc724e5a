"""Shards as downloads leave them (issue #23 item 4): cut inside a member, keys with spaces,
an index older than its shard's content, brace patterns and compressed tars. Each shard is
built for its case with tarfile; the reference is what was written."""

import os
import shutil
import tarfile
import warnings

import pytest

from ov2_megatron.data.shard_index import build_index, ensure_index, index_describes, is_cut
from ov2_megatron.data.shard_spec import resolve_plain_spec
from ov2_megatron.data.shards import iter_shard, iter_shards_checked, read_index
from tests.data.shard_factory import image_bytes, write_img2dataset_shard
from tests.data.test_shard_inputs import tool


def write(path: str, keys: list[str], ext: str = "jpg") -> str:
    return write_img2dataset_shard(path, [
        (key, {ext: image_bytes(i, "JPEG"), "txt": f"caption {i}".encode()})
        for i, key in enumerate(keys)])


def cut_inside_last_image(path: str) -> int:
    """Truncate `path` 100 bytes into its last image; returns the new size."""
    with tarfile.open(path) as tar:
        last_image = [m for m in tar if m.name.endswith(".jpg")][-1]
    size = last_image.offset_data + 100
    with open(path, "r+b") as f:
        f.truncate(size)
    return size


def test_a_cut_shard_is_indexed_to_its_last_complete_sample_and_named(tmp_path):
    path = write(str(tmp_path / "a.tar"), [f"{i:04d}" for i in range(6)])
    full = build_index(path)
    assert not is_cut(path)
    cut_inside_last_image(path)
    assert is_cut(path)
    with pytest.raises(tarfile.ReadError):  # what the loader met before: a crash in tarfile
        list(tarfile.open(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = ensure_index(path)
    assert [str(w.message) for w in caught if "is cut" in str(w.message)] == [
        f"shard {path} is cut (it does not end in a tar's end-of-archive blocks: an "
        "interrupted download or copy?): training reads the 5 complete sample(s) its index "
        "lists and skips the rest; re-download or re-create it"]
    assert [" ".join(f"{e[0]} {e[1]} {e[2]} {e[3]}" for e in sample)
            for sample in read_index(index)] == full[:5]


def test_readers_keep_the_complete_samples_of_a_cut_shard_and_go_on(tmp_path, capsys):
    cut = write(str(tmp_path / "cut.tar"), ["a0", "a1", "a2"])
    cut_inside_last_image(cut)
    whole = write(str(tmp_path / "whole.tar"), ["b0", "b1"])
    keys = [sample.key for _, sample in iter_shards_checked([cut, whole])]
    assert keys == ["a0", "a1", "b0", "b1"]
    assert f"shard {cut} is cut after 2 complete sample(s)" in capsys.readouterr().err


def test_keys_with_spaces_are_samples_and_listed_escaped(tmp_path):
    path = write(str(tmp_path / "s.tar"), ["my photo", "plain", "tab\there"])
    assert [s.key for s in iter_shard(path)] == ["my photo", "plain", "tab\there"]
    names = [[entry[3] for entry in sample] for sample in read_index(ensure_index(path))]
    assert names == [["my%20photo.jpg", "my%20photo.txt"], ["plain.jpg", "plain.txt"],
                     ["tab%09here.jpg", "tab%09here.txt"]]


def test_an_index_that_no_longer_describes_its_shard_is_remade(tmp_path):
    """rsync -a / cp -p put an older shard beside a newer index: the mtime says fresh, the
    offsets are wrong (DALI died on a C++ assert)."""
    path = write(str(tmp_path / "x.tar"), ["k0", "k1", "k2"])
    index = ensure_index(path)
    older = write(str(tmp_path / "other.tar"), ["longer-key-0", "k1"])
    shutil.copyfile(older, path)
    os.utime(path, ns=(1, 1))  # older than the index
    assert not index_describes(index, path)
    assert [[e[3] for e in s] for s in read_index(ensure_index(path))] == [
        ["longer-key-0.jpg", "longer-key-0.txt"], ["k1.jpg", "k1.txt"]]
    assert index_describes(index, path)


def test_brace_patterns_globs_and_compressed_tars_in_every_shard_list(tmp_path):
    paths = [write(str(tmp_path / f"shard-{i:05d}.tar"), [f"k{i}"]) for i in range(4)]
    assert resolve_plain_spec(str(tmp_path / "shard-{00001..00002}.tar")) == paths[1:3]
    assert resolve_plain_spec(f"{tmp_path}/shard-{{00000,00003}}.tar, {paths[1]}") == \
        [paths[0], paths[3], paths[1]]
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "shard-0.tar.gz", "w:gz") as tar:
        tar.add(paths[0], arcname="inner.tar")
    with pytest.raises(ValueError, match="holds only compressed tars.*decompress it"):
        resolve_plain_spec(str(gz))
    with pytest.raises(ValueError, match="shard-0.tar.gz is compressed"):
        resolve_plain_spec(str(gz / "shard-0.tar.gz"))


def test_prepare_shards_names_a_cut_shard_and_converts_the_rest(tmp_path, capsys):
    """It named the shard, then dropped the whole job; a .tar.gz input was not read."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    cut = write(str(inputs / "a.tar"), ["a0", "a1", "a2"])
    cut_inside_last_image(cut)
    whole = write(str(tmp_path / "b.tar"), ["b0", "b1"])
    with tarfile.open(inputs / "b.tar.gz", "w:gz") as tar:
        with tarfile.open(whole) as source:
            for member in source:
                tar.addfile(member, source.extractfile(member))
    assert tool("prepare_shards")(["--input", str(inputs), "--output",
                                   str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert f"shard {cut} is cut after 2 complete sample(s)" in printed.err
    assert "skipped cut_shard: 1" in printed.out
    assert "written: 4 skipped: 1" in printed.out  # a0, a1 before the cut; b0, b1 from .tar.gz
    with open(tmp_path / "out" / "skipped.tsv") as f:
        assert f"{cut} (after 2 complete samples)\tcut_shard" in f.read()
    keys = [s.key for p in sorted((tmp_path / "out").glob("*.tar")) for s in iter_shard(str(p))]
    assert len(keys) == 4
