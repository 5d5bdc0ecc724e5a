"""Webdataset shards: the writer (tar + DALI index, atomic) and a plain reader.

A shard `shard-000042.tar` written here holds samples as consecutive entries `KEY.jpg`,
`KEY.txt` and optionally `KEY.json` (the reader also takes img2dataset's `.png` / `.webp`
images and JSON-only captions); `shard-000042.idx` beside it is DALI's index (format v1.2, what the
`wds2idx` tool of the DALI wheel writes):
    v1.2 <num_samples>
    <ext> <data_offset> <size> <name> [<ext> <data_offset> <size> <name> ...]   one line a sample
We write the index ourselves from the offsets tarfile reports, so no second pass over the tar.
Both files are written under temporary names and renamed into place (index last), so a crash
never leaves a shard that parses but is cut short.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ov2_megatron.data.captions import missing_caption_hint
from ov2_megatron.data.config import index_path_for

INDEX_VERSION = "v1.2"
IMAGE_ENTRY_EXTS = ("jpg", "jpeg", "png", "webp")  # DataConfig.image_extensions' default
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass
class Sample:
    """One image-caption pair as stored in a shard."""

    key: str
    """Unique name within the dataset; no dots (webdataset splits the extension at the first)."""
    jpeg: bytes
    caption: str
    meta: dict | None = None
    """Optional JSON sidecar (source path, synthetic attributes...)."""
    has_txt: bool = True
    """Whether the sample had a `.txt` entry (readers of foreign shards: JSON-only captions)."""
    caption_bytes: bytes | None = field(default=None, compare=False, repr=False)
    """The `.txt` entry as stored (None without one, and on samples built in memory).
    `caption` decodes it leniently; prepare_shards checks these bytes, so a caption that is
    not UTF-8 is skipped and counted rather than written with U+FFFD in it."""


@dataclass
class ShardWriter:
    """Writes samples into numbered shards of `samples_per_shard` under `out_dir`."""

    out_dir: str
    samples_per_shard: int = 1000
    written: int = 0
    shard_paths: list[str] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _index_lines: list[str] = field(default_factory=list)
    _in_shard: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard {self.samples_per_shard} must be >= 1")
        os.makedirs(self.out_dir, exist_ok=True)

    def write(self, sample: Sample) -> None:
        if "." in sample.key or "/" in sample.key or not sample.key:
            raise ValueError(f"sample key {sample.key!r} must be non-empty without '.' or '/'")
        if self._tar is None:
            self._open_next()
        entries = [("jpg", sample.jpeg), ("txt", sample.caption.encode("utf-8"))]
        if sample.meta is not None:
            entries.append(("json", json.dumps(sample.meta, sort_keys=True).encode("utf-8")))
        components = []
        for ext, payload in entries:
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size = len(payload)
            info.mode = 0o644
            info.mtime = 0  # fixed metadata: the same samples give byte-identical shards
            self._tar.addfile(info, io.BytesIO(payload))
            # addfile copies the TarInfo, so derive the data offset from the stream position:
            # payload blocks end exactly at tar.offset.
            data_offset = self._tar.offset - -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            components.append(f"{ext} {data_offset} {info.size} {info.name}")
        self._index_lines.append(" ".join(components))
        self._in_shard += 1
        self.written += 1
        if self._in_shard >= self.samples_per_shard:
            self._close_current()

    def close(self) -> list[str]:
        """Finish the last shard; returns all shard paths written."""
        if self._tar is not None:
            self._close_current()
        return self.shard_paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # failed: drop the partial shard, keep finished ones
            self._tar.close()
            os.remove(self._tar.name)
            self._tar = None

    def _open_next(self) -> None:
        path = os.path.join(self.out_dir, SHARD_PATTERN.format(len(self.shard_paths)))
        self._tar = tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self._index_lines = []
        self._in_shard = 0

    def _close_current(self) -> None:
        tmp_tar = self._tar.name
        self._tar.close()
        self._tar = None
        final_tar = tmp_tar[: -len(".tmp")]
        index = index_path_for(final_tar)
        with open(index + ".tmp", "w") as f:
            f.write(f"{INDEX_VERSION} {len(self._index_lines)}\n")
            f.write("\n".join(self._index_lines) + "\n")
        os.replace(tmp_tar, final_tar)
        os.replace(index + ".tmp", index)
        self.shard_paths.append(final_tar)


class ShardCutError(tarfile.ReadError):
    """A shard that cannot be read to its end: cut inside a member (an interrupted download or
    copy) or not a tar at all. The reader has yielded every complete sample before the cut."""

    def __init__(self, shard: str, complete: int, why: str):
        self.shard, self.complete = shard, complete
        super().__init__(f"shard {shard} is cut after {complete} complete sample(s) ({why}): "
                         "the rest is skipped; re-download or re-create it")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member as webdataset and DALI's index group samples: the key
    is the path up to the first dot of the base name (spaces included). None when the base
    name has no dot or starts with one (hidden files): no sample component."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    return None if dot <= base else (name[:dot], name[dot + 1:])


def iter_members(path: str, skip_data=lambda ext: False
                 ) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(member name, bytes), ...]) of a tar in stored order, grouped as webdataset and
    DALI's index group them: the key is the name up to the first dot of its base name (spaces
    included) and consecutive members with one key are one sample. `skip_data(ext)` True reads
    b"" for that member instead of its bytes. A group is yielded when the next key starts, so
    at a cut the last, possibly partial sample is dropped and ShardCutError raised; a file
    that is no tar at all is a ValueError naming it."""
    mode = "r:" if path.lower().endswith(".tar") else "r:*"  # prepare_shards reads .tar.gz
    try:
        tar = tarfile.open(path, mode)
    except tarfile.TarError as err:
        raise ValueError(f"shard {path} is not a readable tar ({err}): remove it from the "
                         "input or re-download it") from None
    key, members, complete = None, [], 0
    try:
        with tar:
            for member in tar:
                parts = split_member_name(member.name)
                if not member.isreg() or parts is None:
                    continue  # directories, extension-less and hidden files: no component
                if parts[0] != key and members:
                    yield key, members
                    members, complete = [], complete + 1
                key = parts[0]
                data = b"" if skip_data(parts[1]) else tar.extractfile(member).read()
                members.append((member.name, data))
    except (tarfile.TarError, EOFError) as err:
        raise ShardCutError(path, complete, str(err) or type(err).__name__) from None
    if members:
        yield key, members


def iter_shard(path: str, with_images: bool = True) -> Iterator[Sample]:
    """Samples of one shard in stored order, read with tarfile (no DALI). Captions are decoded
    leniently here: this serves tokenizer training, the baseline loader and tests. A cut shard
    yields its complete samples, then raises ShardCutError."""
    def skip(ext: str) -> bool:
        return not with_images and ext.lower() in IMAGE_ENTRY_EXTS

    for key, members in iter_members(path, skip):
        parts = {}
        for name, data in members:
            ext = split_member_name(name)[1]
            parts[ext.lower() if ext.lower() in IMAGE_ENTRY_EXTS else ext] = data
        yield _to_sample(key, parts)


def warn_cut(error: ShardCutError) -> None:
    print(f"warning: {error}", file=sys.stderr, flush=True)


def iter_shards_checked(paths: list[str], caption_key: str | None = "",
                        with_images: bool = True, on_cut=warn_cut
                        ) -> Iterator[tuple[str, Sample]]:
    """(shard path, sample) over `paths` in order. The first sample's caption is checked
    against `caption_key` (None: readers that need no caption): a wrong option is one clear
    ValueError naming the shard and the fix, not a skip report of every sample. A cut shard
    is webdataset's `warn_and_continue`: its complete samples are read, `on_cut(error)` is
    told, and the next shard follows."""
    checked = caption_key is None
    for path in paths:
        try:
            for sample in iter_shard(path, with_images):
                if not checked:
                    hint = missing_caption_hint(f"shard {path} sample {sample.key}",
                                                sample.has_txt, sample.meta, caption_key)
                    if hint:
                        raise ValueError(hint)
                    checked = True
                yield path, sample
        except ShardCutError as err:
            on_cut(err)


def _to_sample(key: str, parts: dict[str, bytes]) -> Sample:
    try:
        meta = json.loads(parts["json"]) if "json" in parts else None
    except ValueError:
        meta = None  # a broken sidecar is a missing one; the caption checks say the rest
    # Lenient for the readers that want text whatever the bytes (tokenizer training); a leading
    # byte-order mark is dropped, as check_caption drops it for training.
    caption = parts.get("txt", b"").decode("utf-8", errors="replace").removeprefix("\ufeff")
    image = next((parts[ext] for ext in IMAGE_ENTRY_EXTS if ext in parts), b"")
    return Sample(key=key, jpeg=image, caption=caption, meta=meta, has_txt="txt" in parts,
                  caption_bytes=parts.get("txt"))


def read_index(index_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI v1.2 index into [sample][component] = (ext, offset, size, name)."""
    with open(index_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"index {index_path} has header {header}, "
                             f"expected '{INDEX_VERSION} N'")
        samples = []
        for line in f:
            fields = line.split()
            samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)])
    if len(samples) != int(header[1]):
        raise ValueError(f"index {index_path} lists {len(samples)} samples, "
                         f"header says {header[1]}")
    return samples


__all__ = ["Sample", "ShardWriter", "ShardCutError", "split_member_name", "iter_members",
           "iter_shard", "iter_shards_checked", "warn_cut", "read_index", "SHARD_PATTERN",
           "INDEX_VERSION"]
