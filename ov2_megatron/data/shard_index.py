"""DALI index files for shards that came without them (img2dataset, webdataset tools).

Without an index DALI's webdataset reader scans every tar at start-up, on every rank, every
run; with 20,000 shards that is minutes. So the loader makes each missing index once, beside
its shard (`X.tar` -> `X.idx`, what `wds2idx` names it), or, when the data directory is
read-only, in a cache directory under a name keyed by the shard's absolute path, size and
mtime (a rewritten shard gets a new index). Each index is written to a temporary name and
renamed, so ranks making the same index at once cannot leave a torn file. An index found is
checked against its shard's content (index_describes), not its mtime, and remade when stale.

Downloads as they arrive: a shard cut inside a member is indexed to its last complete sample
and named in a warning on every use (webdataset's warn_and_continue); whitespace in a key
(`my photo.jpg`) is %-escaped in the index's space-separated name field.

The index is built from tarfile's member offsets: the tar is read header by header (data
blocks are skipped), about a millisecond per 1,000-sample shard, without wds2idx's two `tar`
processes per shard. The grouping of entries into samples is wds2idx's: the key is the path up
to the first dot of the base name, and consecutive entries with one key form one sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
import warnings

from ov2_megatron.data.config import index_path_for
from ov2_megatron.data.shards import INDEX_VERSION, split_member_name

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ov2_megatron", "wds-index")


def build_index(shard: str) -> list[str]:
    """Index lines (one per sample, "ext offset size name ...") of `shard`, in stored order.
    A shard cut inside a member (an interrupted download) is indexed up to its last complete
    sample (ensure_index warns, naming it): webdataset's warn_and_continue, not a crash in
    DALI or tarfile."""
    samples: list[list[str]] = []
    last_key = None
    cut = False
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                name = member.name
                parts = split_member_name(name)
                if not member.isreg() or parts is None or not parts[1]:
                    continue  # directories, hidden and extension-less files: no component
                key, ext = parts
                if any(c.isspace() for c in ext):
                    continue  # DALI matches `ext` as a whole word of the index line
                component = f"{ext} {member.offset_data} {member.size} {_listed_name(name)}"
                if key != last_key:
                    samples.append([component])
                    last_key = key
                else:
                    samples[-1].append(component)
    except (tarfile.TarError, EOFError):
        cut = True
    if cut or is_cut(shard):
        samples = samples[:-1]  # the sample at the cut may have lost members
    if not samples:
        raise ValueError(f"shard {shard} holds no complete KEY.EXT files: it is not a "
                         "webdataset shard, or it is cut before its first sample (make one "
                         "with tools/prepare_shards.py)")
    return [" ".join(parts) for parts in samples]


def _listed_name(name: str) -> str:
    """The member name as the index lists it: the format is space-separated, so whitespace
    in a key (`my photo.jpg`) is %-escaped. DALI reads members by offset; the name only
    travels as the sample's source_info, where bad_data.shard_of finds the shard."""
    return re.sub(r"\s", lambda m: f"%{ord(m.group()):02X}", name)


def is_cut(shard: str) -> bool:
    """True when the tar does not end in zero blocks: every tar writer ends an archive with
    two of them (padded to its record size), so data there means the file was cut."""
    with open(shard, "rb") as f:
        return _ends_cut(f)


def _ends_cut(f) -> bool:
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
    return any(f.read(2 * tarfile.BLOCKSIZE))


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
    """Path of a usable index of `shard`, making it first when there is none or it is stale;
    a cut shard is named in a warning on every use. The shard is opened once for both
    checks: at 100k shards every open per shard per rank counts (#24)."""
    with open(shard, "rb") as f:
        index = _find_or_make(shard, f, cache_dir)
        cut = _ends_cut(f)
    if cut:
        warnings.warn(f"shard {shard} is cut (it does not end in a tar's end-of-archive "
                      "blocks: an interrupted download or copy?): training reads the "
                      f"{samples_in_index(index)} complete sample(s) its index lists and skips "
                      "the rest; re-download or re-create it", stacklevel=2)
    return index


def _find_or_make(shard: str, f, cache_dir: str) -> str:
    beside = index_path_for(shard)
    if index_describes(beside, shard, f):
        return beside
    cached = cached_index_path(shard, cache_dir or DEFAULT_CACHE_DIR)
    if index_describes(cached, shard, f):
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


def index_describes(index: str, shard: str, opened=None) -> bool:
    """Whether `index` describes `shard` as it is now. Not by mtime: `rsync -a` and `cp -p`
    put an older copy of a shard beside a newer index, and DALI then reads at wrong offsets
    (a C++ assert). The check reads the index's first and last entries and the tar headers
    just before those members: the shard must hold members of the listed sizes and names at
    the listed offsets. Four small reads per shard (`opened`: the shard's open file)."""
    try:
        first, last = _end_entries(index)
        with contextlib.nullcontext(opened) if opened else open(shard, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return all(_member_at(f, size, *entry) for entry in (first, last))
    except (OSError, ValueError, IndexError):
        return False


def _end_entries(index: str) -> tuple[tuple[int, int, str], tuple[int, int, str]]:
    """(offset, size, name) of the first sample's first and the last sample's last member."""
    with open(index, "rb") as f:
        head = f.read(8192).decode().split("\n")
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        tail = f.read().decode().rstrip("\n").split("\n")
    if head[0].split()[0] != INDEX_VERSION or len(head) < 2:
        raise ValueError(f"index {index}: not a {INDEX_VERSION} index")
    first, last = head[1].split(), tail[-1].split()
    return (int(first[1]), int(first[2]), first[3]), (int(last[-3]), int(last[-2]), last[-1])


def _member_at(f, shard_size: int, offset: int, size: int, listed: str) -> bool:
    if offset < tarfile.BLOCKSIZE or offset + size > shard_size:
        return False
    f.seek(offset - tarfile.BLOCKSIZE)
    try:
        header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), tarfile.ENCODING,
                                         "surrogateescape")
    except tarfile.HeaderError:
        return False
    # Names past 100 characters live in a pax / GNU long-name record before this header,
    # which holds a truncated copy: then the size and a valid header checksum decide.
    return header.size == size and (_listed_name(header.name) == listed or len(listed) > 100)


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


__all__ = ["build_index", "write_index", "ensure_index", "is_cut", "index_describes",
           "ensure_indexes", "cached_index_path",
           "samples_in_index", "DEFAULT_CACHE_DIR"]
