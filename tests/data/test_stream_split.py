"""Each training stream hands DALI only its own shards (#24 item 1, data/stream_split.py).
The reference is DALI's own split: the loader as it was, giving the reader every shard with
shard_id=dp_rank, num_shards=dp_size. Over shards of uneven size, whose ranges cut shards in
the middle, every stream's batches equal the reference's bitwise, images included (same
samples in the same order, same augmentation draws), and the process maps only the shards
of its range."""

import gc
import os

import pytest
import torch

from ov2_megatron.data.dali_pipeline import ImageCaptionLoader
from ov2_megatron.data.stream_split import sample_range, stream_shards
from tests.data.shard_factory import jpeg_bytes, write_raw_shard
from tests.data.test_dali_pipeline import H, W, make_config, tokenizer_model  # noqa: F401

SIZES = (7, 11, 3, 9, 13, 5)  # 48 samples; every split of 2-4 streams cuts a shard


class WholeListLoader(ImageCaptionLoader):
    """The reader before #24: every shard, split by DALI (the reference)."""

    def _reader_inputs(self):
        return self.shards, self._index_paths, None


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    root, first = tmp_path_factory.mktemp("uneven"), 0
    for s, size in enumerate(SIZES):
        write_raw_shard(str(root / f"part-{s}.tar"), [
            (f"{i:05d}", {"jpg": jpeg_bytes(i, (W, H)), "txt": f"sample {i} good".encode()})
            for i in range(first, first + size)])
        first += size
    return str(root)


def mapped_shards(folder: str) -> set[str]:
    """Shards of `folder` memory-mapped into this process (loaders of other tests may live)."""
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f
                if line.rstrip().endswith(".tar") and line.split()[-1].startswith(folder)}


@pytest.mark.parametrize("streams", [2, 3, 4])
def test_each_stream_reads_dalis_own_range_from_its_own_shards(uneven_shards, tokenizer_model,
                                                               tmp_path, streams):
    buffer, batch = 4, 4
    config = make_config(uneven_shards, tokenizer_model, index_cache_dir=str(tmp_path),
                         shuffle_buffer=buffer)
    for stream in range(streams):
        first, end = sample_range(list(SIZES), stream, streams)
        # Up to the end of the range, less the buffer: past it DALI's own split reads on into
        # the next stream's range (and fills a larger buffer from there), this one its own.
        batches = (end - first - buffer) // batch
        args = dict(dp_rank=stream, dp_size=streams, batch_size=batch, device="cpu")
        reference = WholeListLoader(config, **args)
        want = [next(reference) for _ in range(batches)]
        del reference
        gc.collect()  # its mappings go with it
        loader = ImageCaptionLoader(config, **args)
        got = [next(loader) for _ in range(batches)]
        assert len(got) >= 2
        for a, b in zip(got, want):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])
        own = set(loader._reader_shards)
        assert mapped_shards(uneven_shards) == own < set(loader.shards), (stream, own)


def test_ranges_partition_the_samples_and_boundary_shards_get_partial_indexes(tmp_path):
    counts = [7, 11, 3]
    assert [sample_range(counts, k, 3) for k in range(3)] == [(0, 7), (7, 14), (14, 21)]
    index = tmp_path / "a.idx"
    lines = [f"jpg {512 + 1024 * i} 10 k{i}.jpg" for i in range(11)]
    index.write_text(f"v1.2 11\n" + "\n".join(lines) + "\n")
    full = [str(tmp_path / "x.idx"), str(index), str(tmp_path / "y.idx")]
    paths, indexes = stream_shards(["x.tar", "a.tar", "y.tar"], full, counts, 1, 3,
                                   str(tmp_path / "cache"))
    assert paths == ["a.tar"]  # samples 7-13 all lie in a.tar: its lines 0-6
    with open(indexes[0]) as f:
        assert f.read().split("\n") == ["v1.2 7", *lines[:7], ""]
    assert os.path.dirname(indexes[0]) == str(tmp_path / "cache")
