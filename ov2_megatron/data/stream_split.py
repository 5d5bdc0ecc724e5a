"""Each training stream hands DALI only its own shards (#24 item 1).

DALI's webdataset reader splits the samples of the list it is given into `num_shards`
contiguous ranges and reads range `shard_id`; but it opens, memory-maps and indexes every
shard of the list first (360 B per sample per rank: docs/benchmarks/2026-12-08-loader-scale.md).
So the loader cuts the same range itself: stream k of S gets the samples
[k*N//S, (k+1)*N//S) of the seeded shard list (N samples), the very range DALI would pick,
and DALI gets only the shards that overlap it, with num_shards=1. A shard cut by a range
boundary gets a partial index: the lines of its full index that fall inside the range (DALI
reads each member at its listed offset, so a subset of the lines is a valid index). With the
same reader seed, the stream is the one DALI's own split gives, sample for sample
(tests/data/test_stream_split.py holds them equal, shuffled and not).

Each epoch the stream reads its range again, in a new order from the shuffle buffer: the
range itself no longer moves to the next stream's, as DALI's own split did (stick_to_shard=
False), since that needs every shard's index on every rank.
"""

from __future__ import annotations

import hashlib
import os

from ov2_megatron.data.shard_index import DEFAULT_CACHE_DIR
from ov2_megatron.data.shards import INDEX_VERSION


def sample_range(counts: list[int], stream: int, streams: int) -> tuple[int, int]:
    """[first, end) of stream `stream` of `streams` over the concatenated samples: DALI's split."""
    total = sum(counts)
    return stream * total // streams, (stream + 1) * total // streams


def stream_shards(shards: list[str], indexes: list[str], counts: list[int], stream: int,
                  streams: int, cache_dir: str = "") -> tuple[list[str], list[str]]:
    """(shards, index paths) DALI reads for `stream`: those overlapping its range, with partial
    indexes (written once, under cache_dir) for the ones a range boundary cuts."""
    first, end = sample_range(counts, stream, streams)
    paths, own_indexes, start = [], [], 0
    for shard, index, count in zip(shards, indexes, counts):
        low, high = max(first, start) - start, min(end, start + count) - start
        if low < high:
            paths.append(shard)
            own_indexes.append(index if (low, high) == (0, count) else
                               _partial_index(index, low, high, cache_dir))
        start += count
    return paths, own_indexes


def _partial_index(index: str, low: int, high: int, cache_dir: str) -> str:
    """An index of samples [low, high) of `index`, named by the full index's path, size and
    mtime and the range, so a remade full index gets a new partial one."""
    st = os.stat(index)
    key = f"{os.path.abspath(index)}\0{st.st_size}\0{st.st_mtime_ns}\0{low}\0{high}".encode()
    stem = os.path.basename(index)[: -len(".idx")] if index.endswith(".idx") else index
    folder = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    path = os.path.join(folder, f"{os.path.basename(stem)}-{hashlib.sha256(key).hexdigest()[:20]}"
                                f"-{low}-{high}.idx")
    if os.path.isfile(path):
        return path
    with open(index) as f:
        lines = f.read().split("\n")[1:]  # after the "v1.2 N" header: one line per sample
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {high - low}\n" + "\n".join(lines[low:high]) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["sample_range", "stream_shards"]
