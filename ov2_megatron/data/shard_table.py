"""The training set's shards, checked and indexed once, for every loader of the run (#24 item 3).

Resolving a shard spec opens every shard (its first tar header), making sure of the index
files opens every shard and index again (content check, missing ones built), and splitting
the set into stream ranges reads every index header for the sample counts. Done by each
reading rank, that is several file-system operations per shard per rank: 100k shards x 4,096
ranks is billions per start. So one rank builds a ShardTable (the resolved shard groups of the
spec, each shard's index path and sample count), and a loader given the table touches no file
but the shards and partial indexes of its own range.
"""

from __future__ import annotations

from dataclasses import dataclass

from ov2_megatron.data.mixing import parse_sources
from ov2_megatron.data.shard_index import ensure_indexes, samples_in_index
from ov2_megatron.data.shard_spec import resolve_plain_spec


@dataclass(frozen=True)
class ShardTable:
    groups: tuple[tuple[str, ...], ...]
    """The spec's sources in order, each its shards in order (a plain spec: one group)."""
    index: dict[str, str]
    """Shard -> the index file that describes it (beside it, or in the index cache)."""
    count: dict[str, int]
    """Shard -> samples in its index."""

    def unique(self) -> list[str]:
        return sorted(self.index)


def build_table(spec, cache_dir: str = "") -> ShardTable:
    """Resolve and check `spec`, make sure of every index (built where missing, remade where
    stale, cut shards named), and count the samples: the file work of a loader's start-up."""
    groups = tuple(tuple(resolve_plain_spec(source.spec)) for source in parse_sources(spec))
    unique = sorted({shard for group in groups for shard in group})
    indexes = ensure_indexes(unique, cache_dir)
    return ShardTable(groups=groups, index=dict(zip(unique, indexes)),
                      count={shard: samples_in_index(index)
                             for shard, index in zip(unique, indexes)})


__all__ = ["ShardTable", "build_table"]
