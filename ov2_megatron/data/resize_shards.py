"""A low-resolution copy of existing shards for stage 1 (tools/prepare_shards.py --resize).

Stage 1 trains at 84 px, but DALI decodes the stored image before it crops: from full-size
JPEGs (400-640 px) the CPU decode dominates the input pipeline (issue 16). This copy stores
each image with its shorter side at `short_side` (96-128 px): at 128 a 480x640 original
becomes 128x171, 14x fewer pixels to decode per sample. Every shard keeps its name, its
sample keys and their order; every member but the image (`.txt`, `.json`, any other
extension) is copied byte for byte; the DALI index (shard_index.write_index) is written
beside each new shard.

The image: JPEG, PNG or WebP (what the loader reads) is decoded with PIL (JPEG through
`draft`, libjpeg's DCT scaling, to no less than twice the target size, then Lanczos: PIL's
`thumbnail` rule, antialiased), rotated by its EXIF orientation (DALI's decoder applies it to
the original, so the copy stores what training sees), resized to keep its aspect ratio, and
saved as JPEG at `quality` with 4:4:4 chroma (4:2:0 would halve the colour resolution that
the captions name). An image whose shorter side is already <= `short_side` is never upscaled:
a JPEG is kept byte for byte, others are re-encoded at their size. A sample whose image fails
the loader's header checks or PIL's decode is skipped (all its members) and counted by
reason, as the loader would replace it; an unreadable rest of an input tar ends that shard.

What changes for the augmentation (issue "Fidelity"): the random-resized crop draws its area
(`data.crop_scale`) and aspect ratio (`data.crop_ratio`) relative to the *stored* image, so
the same field of view is drawn from the copy as from the original; only the pixels per crop
drop. A crop of area fraction s and aspect r of a square image of side S spans S*sqrt(s*r) by
S*sqrt(s/r) stored pixels; while both are >= 84 the output is downscaled and the copy loses
only detail the 84 px output cannot hold anyway (plus a second resampling and one JPEG
generation). With the paper's crop_scale (0.4, 1) and crop_ratio (3/4, 4/3) that holds for
every crop from S >= 154; at S = 128 the smallest crops are upscaled by up to 1.2x along one
side, at S = 96 by up to 1.6x: detail above the stored resolution is lost there (a wider
image, S by L > S, has longer crop sides). Stage 2 (224 px) must read the full-size shards: a
128 px copy would upscale every crop.

Resumable and atomic: each shard is written under a hidden temporary name, fsynced, its
record (`.resize/NAME.json`: settings, input size and mtime, counts) and index written, then
renamed into place. A killed run leaves only complete shards; a rerun skips every shard whose
record matches the settings and input and whose index and tar agree on the sample count.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageOps

from ov2_megatron.data.config import index_path_for
from ov2_megatron.data.image_decode import to_rgb
from ov2_megatron.data.sample_checks import Issue, check_encoded_image
from ov2_megatron.data.shard_index import build_index, samples_in_index, write_index
from ov2_megatron.data.shard_spec import expand_braces, resolve_plain_spec, split_outside_braces
from ov2_megatron.data.shards import IMAGE_ENTRY_EXTS, iter_members, split_member_name

RECORD_DIR = ".resize"
_FORMAT_VERSION = 1
MIN_SHORT_SIDE = 16
# Decode to at least this multiple of the target before the final Lanczos (PIL's
# `reducing_gap`): DCT scaling alone aliases; from 2x, Lanczos removes it.
_REDUCING_GAP = 2


@dataclass(frozen=True)
class ResizeSettings:
    """What a resized copy depends on; recorded per shard, so changed settings rewrite it."""

    short_side: int
    """Shorter side of the stored images in pixels (96-128 for 84 px training)."""
    quality: int = 90
    """JPEG quality of re-encoded images (libjpeg scale 1-95)."""
    max_image_pixels: int = 40_000_000
    """Images whose header declares more pixels are skipped (as DataConfig.max_image_pixels)."""

    def validate(self) -> None:
        if self.short_side < MIN_SHORT_SIDE:
            raise ValueError(f"--resize {self.short_side} is too small: use >= {MIN_SHORT_SIDE} "
                             "(96-128 for stage 1 at 84 px)")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"--quality {self.quality}: use 1-95 (above 95 libjpeg only "
                             "grows the files)")
        if self.max_image_pixels < 1:
            raise ValueError(f"--max-image-pixels {self.max_image_pixels}: use >= 1")


@dataclass
class ShardResult:
    """One shard's outcome (also its record in `.resize/NAME.json`)."""

    name: str
    samples: int = 0
    resized: int = 0
    """Images downscaled to short_side."""
    kept_small: int = 0
    """Images already <= short_side: stored as they were (re-encoded only if not JPEG)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped samples by reason."""
    reused: bool = False
    """Complete from an earlier run: not rewritten."""


def resize_image(data: bytes, settings: ResizeSettings) -> tuple[bytes | None, str, bool]:
    """(jpeg, "", downscaled) for a usable image, (None, reason, False) for one to skip."""
    issue = check_encoded_image(data, settings.max_image_pixels)
    if issue != Issue.OK:
        return None, issue.metric_name, False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            small = min(image.size) <= settings.short_side
            if small and image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data, "", False  # never upscale; the original bytes lose nothing
            if not small:
                image.draft("RGB", _target_size(image.size, settings.short_side, _REDUCING_GAP))
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
                Image.DecompressionBombError) as err:
            return None, f"undecodable: {type(err).__name__}", False
    if image.mode not in ("RGB", "L"):
        image = to_rgb(image)  # 16-bit scaled, not clipped to white
    if not small:
        image = image.resize(_target_size(image.size, settings.short_side), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=settings.quality, subsampling=0)
    return out.getvalue(), "", not small


def _target_size(size: tuple[int, int], short_side: int, gap: int = 1) -> tuple[int, int]:
    """(w, h) with the shorter side gap * short_side, the aspect ratio kept (rounded)."""
    w, h = size
    side = short_side * gap
    return (side, max(side, round(h * side / w))) if w <= h else \
        (max(side, round(w * side / h)), side)


def resize_sample(members: list[tuple[str, bytes]],
                  settings: ResizeSettings) -> tuple[list[tuple[str, bytes]] | None, str, bool]:
    """The sample's members with its image resized, or (None, reason, False)."""
    exts = {split_member_name(name)[1]: i for i, (name, _) in enumerate(members)}
    by_case = {ext.lower(): ext for ext in exts}  # KEY.JPG is an image, as for the loader
    image_ext = next((by_case[ext] for ext in IMAGE_ENTRY_EXTS if ext in by_case), None)
    if image_ext is None:
        return None, "missing_image", False
    position = exts[image_ext]
    name, data = members[position]
    jpeg, reason, downscaled = resize_image(data, settings)
    if jpeg is None:
        return None, reason, False
    if jpeg is not data:  # now a JPEG: name it so (a KEY.jpg would have been the pick)
        name = name[: -len(image_ext)] + "jpg"
    return members[:position] + [(name, jpeg)] + members[position + 1:], "", downscaled


def resize_shard(job: tuple[str, str, ResizeSettings]) -> ShardResult:
    """Resize input shard `job[0]` into directory `job[1]` unless a verified copy is there.
    Runs in pool workers."""
    source, out_dir, settings = job
    name = os.path.basename(source)
    target = os.path.join(out_dir, name)
    record = _record_of(source, settings)
    previous = _verified_result(target, record)
    if previous is not None:
        return previous
    _remove_outputs(target)
    result = ShardResult(name=name)
    skipped: Counter = Counter()
    tmp = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")  # hidden: no glob sees it
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        try:
            for _, members in iter_members(source):
                kept, reason, downscaled = resize_sample(members, settings)
                if kept is None:
                    skipped[reason.split(":")[0]] += 1
                    continue
                _add_members(tar, kept)
                result.samples += 1
                result.resized += int(downscaled)
                result.kept_small += int(not downscaled)
        except (tarfile.TarError, EOFError):  # reading only: a failed write must raise
            skipped["unreadable_tar_rest"] += 1  # the samples before it are kept
    result.skipped = dict(skipped)
    _commit(tmp, target, dict(record, result=asdict(result)))
    return result


def _add_members(tar: tarfile.TarFile, members: list[tuple[str, bytes]]) -> None:
    for name, payload in members:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(payload), 0o644
        info.mtime = 0  # fixed metadata: a resumed run writes the same bytes as a whole one
        tar.addfile(info, io.BytesIO(payload))


def _commit(tmp: str, target: str, record: dict) -> None:
    """fsync the tar, write its record and index, rename it into place: the rename is the
    commit, so a kill before it leaves no shard, only a temporary file the next run removes."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    samples = record["result"]["samples"]
    _write_json(_record_path(target), dict(record, tar_size=os.path.getsize(tmp)))
    if samples == 0:  # nothing usable: no empty shard for the loader to trip over
        os.remove(tmp)
        return
    write_index(tmp, index_path_for(target))  # after the tar is complete: index mtime >= tar's
    os.replace(tmp, target)
    directory = os.open(os.path.dirname(target) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def _record_of(source: str, settings: ResizeSettings) -> dict:
    st = os.stat(source)
    return {"format": _FORMAT_VERSION, "settings": asdict(settings),
            "input": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}


def _verified_result(target: str, record: dict) -> ShardResult | None:
    """The earlier result when `target` is a complete copy made with the same settings from
    the same input (its record, tar size and index all agree); None when it must be written."""
    try:
        with open(_record_path(target), encoding="utf-8") as f:
            previous = json.load(f)
        if {k: previous.get(k) for k in record} != record:
            return None
        result = ShardResult(**dict(previous["result"], reused=True))
        if result.samples == 0:
            return result
        if os.path.getsize(target) != previous["tar_size"]:
            return None
        index = index_path_for(target)
        with open(index) as f:
            stored = f.read().splitlines()[1:]
        fresh = build_index(target)  # headers only: about a millisecond per 1,000 samples
        count = samples_in_index(index)
    except (OSError, ValueError, TypeError, KeyError, tarfile.TarError):
        return None
    return result if stored == fresh and count == len(fresh) == result.samples else None


def _remove_outputs(target: str) -> None:
    """Drop an outdated or partial copy first, so tar, index and record never mismatch."""
    for path in (target, index_path_for(target), _record_path(target)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _record_path(target: str) -> str:
    return os.path.join(os.path.dirname(target), RECORD_DIR, os.path.basename(target) + ".json")


def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ResizeReport:
    """Every shard's result, in input order."""

    shards: list[ShardResult]

    def total(self, name: str) -> int:
        return sum(getattr(shard, name) for shard in self.shards)

    def skipped(self) -> dict[str, int]:
        counts: Counter = Counter()
        for shard in self.shards:
            counts.update(shard.skipped)
        return dict(counts)


def resize_shards(spec: str, out_dir: str, settings: ResizeSettings, workers: int = 1,
                  on_shard: Callable[[ShardResult, int], None] | None = None) -> ResizeReport:
    """Resize every shard of `spec` into `out_dir`, `workers` shards at a time;
    `on_shard(result, number of shards)` is called as each finishes (any order). Raises
    ValueError / FileNotFoundError naming the mistake before any work."""
    settings.validate()
    inputs = resolve_inputs(spec)
    _check_output(inputs, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _remove_temporaries(out_dir)
    jobs = [(path, out_dir, settings) for path in inputs]
    workers = max(1, min(workers, len(jobs)))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    results = {}
    try:
        for result in (pool.imap_unordered(resize_shard, jobs) if pool
                       else map(resize_shard, jobs)):
            results[result.name] = result
            if on_shard:
                on_shard(result, len(jobs))
    finally:
        if pool:
            pool.terminate()
    return ResizeReport([results[os.path.basename(path)] for path in inputs])


def resolve_inputs(spec: str) -> list[str]:
    """Tar paths of `spec`: a .tar, a folder of them, a glob, a brace pattern as webdataset
    writes them (`shard-{000000..000099}.tar`, `{a,b}.tar`), or a comma list of those."""
    paths: list[str] = []
    for part in split_outside_braces(spec):
        for path in expand_braces(part):
            if not glob.has_magic(path) and not os.path.exists(path):
                raise FileNotFoundError(f"input {path} does not exist: give a .tar shard, a "
                                        "folder of them, a glob or a brace pattern")
            paths.extend(resolve_plain_spec(path))
    if not paths:
        raise ValueError(f"input {spec!r} names no shards")
    return paths


def _check_output(inputs: list[str], out_dir: str) -> None:
    seen: dict[str, str] = {}
    for path in inputs:
        if os.path.abspath(os.path.dirname(path)) == os.path.abspath(out_dir):
            raise ValueError(f"--output {out_dir} holds the input shard {path}: the copy keeps "
                             "the shard names, write it into another folder")
        name = os.path.basename(path)
        if name in seen:
            raise ValueError(f"two input shards are named {name} ({seen[name]}, {path}): the "
                             "copy keeps the names, resize each set into its own --output")
        seen[name] = path


def _remove_temporaries(out_dir: str) -> None:
    """What a killed run left: temporary tars, indexes and records (never a finished file)."""
    patterns = (".*.tar.*.tmp", "*.idx.*.tmp", os.path.join(RECORD_DIR, "*.json.*.tmp"))
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            os.remove(path)


__all__ = ["ResizeSettings", "ShardResult", "ResizeReport", "resize_image", "resize_sample",
           "iter_members", "resize_shard", "resize_shards", "resolve_inputs", "RECORD_DIR",
           "MIN_SHORT_SIDE"]
