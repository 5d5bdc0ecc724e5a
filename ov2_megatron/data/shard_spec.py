"""Shard specs -> concrete tar paths, each opened and checked before any compute.

One spelling everywhere a shard list is taken (training, validation, mixtures, prepare_shards
--resize, train_tokenizer, extract_features, bench_data):
    data/shard-000042.tar                  one tar
    data/                                  every *.tar in the folder
    data/shard-*.tar                       a glob
    data/shard-{000000..000099}.tar        a brace pattern, webdataset's convention
                                           (ranges keep their bounds' zero padding;
                                           {a,b} lists alternatives)
    a.tar, b/, c-*.tar                     a comma list of any of these
Compressed tars (.tar.gz, .tgz, ...) cannot be read in place: DALI's webdataset reader needs
the members at fixed byte offsets. Naming one, or a folder holding only such tars, is an
error that says how to convert it, never a silent skip.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile

_TAR_BLOCK = 512
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_CONVERT_HINT = ("DALI reads uncompressed tars only: decompress it (gunzip / zstd -d) or "
                 "convert it with tools/prepare_shards.py --input FILE --output DIR")


def resolve_shard_spec(spec: str | list) -> list[str]:
    """Expand any shard spec (see DataConfig.train_shards) into validated tar paths; a
    mixture's sources are concatenated (their weights apply in the loader, mixing.py)."""
    from ov2_megatron.data.mixing import parse_sources

    sources = parse_sources(spec)
    if not sources:
        raise ValueError("shard spec is empty: give a glob, directory or comma list of .tar files")
    paths: list[str] = []
    for source in sources:
        paths.extend(resolve_plain_spec(source.spec))
    return paths


def resolve_plain_spec(spec: str) -> list[str]:
    """Expand a tar / folder / glob / brace pattern / comma list into validated tar paths."""
    if not spec.strip():
        raise ValueError("shard spec is empty: give a glob, directory or comma list of .tar files")
    paths: list[str] = []
    for part in split_outside_braces(spec):
        for pattern in expand_braces(part):
            paths.extend(_expand_one(pattern))
    for path in paths:
        check_shard(path)
    return paths


def _expand_one(part: str) -> list[str]:
    if os.path.isdir(part):
        found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
        if found:
            return found
        compressed = _compressed_in(part)
        if compressed:
            raise ValueError(f"shard directory {part} holds only compressed tars (e.g. "
                             f"{compressed[0]}): {_CONVERT_HINT}")
        raise FileNotFoundError(f"shard directory {part} holds no .tar files: run "
                                "tools/prepare_shards.py --output there first")
    if glob.has_magic(part):
        found = sorted(glob.glob(part))
        if not found:
            raise FileNotFoundError(f"shard glob {part} matched no files: check the path")
        return found
    return [part]


def _compressed_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(COMPRESSED_SUFFIXES))


def check_shard(path: str) -> None:
    """Open `path` and parse its first tar header; raise a clear error if that fails."""
    if path.lower().endswith(COMPRESSED_SUFFIXES):
        raise ValueError(f"shard {path} is compressed: {_CONVERT_HINT}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard {path} does not exist: fix the shard list in the config")
    if not os.path.isfile(path):
        raise ValueError(f"shard {path} is not a regular file: list .tar files or a directory")
    try:
        with open(path, "rb") as f:
            head = f.read(_TAR_BLOCK)
    except OSError as err:
        raise PermissionError(f"shard {path} cannot be read ({err.strerror}): fix its "
                              "permissions or remove it from the shard list") from err
    if len(head) < _TAR_BLOCK:
        raise ValueError(f"shard {path} is {len(head)} bytes, too short to be a tar: "
                         "re-create it with tools/prepare_shards.py")
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        raise ValueError(f"shard {path} is not a valid tar ({err}): re-create it with "
                         "tools/prepare_shards.py or remove it from the shard list") from err


def split_outside_braces(spec: str) -> list[str]:
    """Comma-separated parts of `spec`, where commas inside {...} belong to a brace pattern."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec + ","):
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            parts.append(spec[start:i].strip())
            start = i + 1
    return [part for part in parts if part]


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}.tar` -> x.tar, y.tar."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:  # zero-padded like its bounds: {000..009} -> 000, 001, ...
        low, high = span.groups()
        width = len(low) if len(low) == len(high) else 0
        choices = [f"{i:0{width}d}" for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [path for choice in choices for path in
            expand_braces(pattern[:match.start()] + choice + pattern[match.end():])]


__all__ = ["resolve_shard_spec", "resolve_plain_spec", "check_shard", "split_outside_braces",
           "expand_braces", "COMPRESSED_SUFFIXES"]
