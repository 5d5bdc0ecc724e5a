"""DALI index files for shards that came without them (img2dataset, webdataset tools).

Without an index DALI's webdataset reader scans every tar at start-up, on every rank, every
run; with 20,000 shards that is minutes. So the loader makes each missing index once, beside
its shard (`X.tar` -> `X.idx`, what `wds2idx` names it), or, when the data directory is
read-only, in a cache directory under a name keyed by the shard's absolute path, size and
mtime (a rewritten shard gets a new index). Each index is written to a temporary name and
renamed, so ranks making the same index at once cannot leave a torn file.

The index is built from tarfile's member offsets: the tar is read header by header (data
blocks are skipped), about a millisecond per 1,000-sample shard, without wds2idx's two `tar`
processes per shard. The grouping of entries into samples is wds2idx's: the key is the path up
to the first dot of the base name, and consecutive entries with one key form one sample.
"""

from __future__ import annotations

import hashlib
import os
import tarfile

from ov2_megatron.data.config import index_path_for
from ov2_megatron.data.shards import INDEX_VERSION

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ov2_megatron", "wds-index")


def build_index(shard: str) -> list[str]:
    """Index lines (one per sample, "ext offset size name ...") of `shard`, in stored order."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            name = member.name
            if not member.isreg() or any(c.isspace() for c in name):
                continue  # the index format is space-separated: such a name cannot be listed
            dot = name.find(".", name.rfind("/") + 1)
            key, ext = (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")
            if not key or key.endswith("/") or not ext:
                continue  # hidden files and extension-less entries are no sample component
            component = f"{ext} {member.offset_data} {member.size} {name}"
            if key != last_key:
                samples.append([component])
                last_key = key
            else:
                samples[-1].append(component)
    if not samples:
        raise ValueError(f"shard {shard} holds no KEY.EXT files: it is not a webdataset shard "
                         "(make one with tools/prepare_shards.py)")
    return [" ".join(parts) for parts in samples]


def write_index(shard: str, index_path: str) -> None:
    lines = build_index(shard)
    tmp = f"{index_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
    os.replace(tmp, index_path)


def cached_index_path(shard: str, cache_dir: str) -> str:
    """Where the index of `shard` lives in `cache_dir`: keyed by path, size and mtime."""
    st = os.stat(shard)
    key = f"{os.path.abspath(shard)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:20]
    stem = os.path.basename(shard)[: -len(".tar")] if shard.endswith(".tar") else shard
    return os.path.join(os.path.expanduser(cache_dir), f"{os.path.basename(stem)}-{digest}.idx")


def ensure_index(shard: str, cache_dir: str = "") -> str:
    """Path of a usable index of `shard`, making it first when there is none."""
    beside = index_path_for(shard)
    if _usable(beside, shard):
        return beside
    cached = cached_index_path(shard, cache_dir or DEFAULT_CACHE_DIR)
    if _usable(cached, shard):
        return cached
    try:
        write_index(shard, beside)
        return beside
    except PermissionError:
        pass  # read-only data directory: fall through to the cache
    except OSError as err:
        if err.errno not in (13, 30):  # EACCES, EROFS
            raise
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    write_index(shard, cached)
    return cached


def _usable(index: str, shard: str) -> bool:
    # An index older than its shard describes an earlier version of it: offsets would be wrong.
    try:
        st = os.stat(index)
    except OSError:
        return False
    return st.st_size > 0 and st.st_mtime_ns >= os.stat(shard).st_mtime_ns


def ensure_indexes(shards: list[str], cache_dir: str = "") -> list[str]:
    """Index paths for all `shards` (DALI needs all or none), made where missing."""
    return [ensure_index(shard, cache_dir) for shard in shards]


def samples_in_index(index: str) -> int:
    """Sample count from an index header ("v1.2 N"), without reading the rest."""
    with open(index) as f:
        header = f.readline().split()
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise ValueError(f"index {index} has header {header}, expected '{INDEX_VERSION} N': "
                         "delete it and it is made again")
    return int(header[1])


__all__ = ["build_index", "write_index", "ensure_index", "ensure_indexes", "cached_index_path",
           "samples_in_index", "DEFAULT_CACHE_DIR"]
