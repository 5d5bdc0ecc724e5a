"""Turn a folder, a table or existing webdataset shards (img2dataset's, a tar or a folder of
tars) of (image, caption) into validated shards; the library behind tools/prepare_shards.py
and the synthetic dataset. Captions come from `.txt` or, with `caption_key`, from a `.json`
field (captions.py: the same meaning as data.caption_key).

Every image is decoded once (PIL). Samples that cannot be trained on are skipped and listed
with their reason in `skipped.tsv`; usable non-JPEG images are re-encoded to JPEG so the
loader's contract (JPEG + UTF-8 caption) holds for every written sample. `manifest.json` is
written last and records a fingerprint of the inputs: a re-run with unchanged inputs does
nothing, a re-run with changed inputs rewrites the shards and removes stale ones.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ov2_megatron.data.captions import candidates_in
from ov2_megatron.data.sample_checks import Issue, check_caption, inspect_image
from ov2_megatron.data.shard_spec import COMPRESSED_SUFFIXES, expand_braces, split_outside_braces
from ov2_megatron.data.shards import (Sample, ShardCutError, ShardWriter, iter_shards_checked,
                                       warn_cut)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath", "img", "jpg")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "description")
MANIFEST, SKIP_REPORT = "manifest.json", "skipped.tsv"
_FORMAT_VERSION = 2


@dataclass
class RawSample:
    """An input before validation: where it came from, its bytes (or a path to read) and text."""

    source: str
    image: bytes | None = None
    image_path: str | None = None
    caption: bytes | str | None = None
    meta: dict | None = None
    skip_reason: str = ""
    """Set by the input reader when the sample is already known to be unusable."""


@dataclass
class PrepareReport:
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: int = 0
    shards: list[str] = field(default_factory=list)
    up_to_date: bool = False

    def reasons(self) -> dict[str, int]:
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))


def _validate(args: tuple[RawSample, int, int]) -> tuple[str, Sample | None, str, bool]:
    """(source, sample, "", converted) or (source, None, reason, False). Runs in pool workers."""
    raw, index, max_pixels = args
    if raw.skip_reason:
        return raw.source, None, raw.skip_reason, False
    if raw.caption is None:
        return raw.source, None, "missing_caption", False
    caption_bytes = (raw.caption.encode("utf-8", "surrogateescape")
                     if isinstance(raw.caption, str) else raw.caption)
    issue, caption = check_caption(caption_bytes)
    if issue != Issue.OK:
        return raw.source, None, issue.metric_name, False
    data = raw.image
    if data is None:
        try:
            with open(raw.image_path, "rb") as f:
                data = f.read()
        except OSError as err:
            return raw.source, None, f"unreadable_image: {err.strerror}", False
    jpeg, reason = inspect_image(data, max_pixels)
    if jpeg is None:
        return raw.source, None, reason, False
    meta = dict(raw.meta or {}, source=raw.source)
    sample = Sample(key=f"{index:09d}", jpeg=jpeg, caption=caption, meta=meta)
    return raw.source, sample, "", jpeg is not data


def write_samples(samples: Iterable[RawSample], out_dir: str, samples_per_shard: int,
                  max_image_pixels: int = 40_000_000, workers: int = 1) -> PrepareReport:
    """Validate `samples` (decoding each image once) and write the good ones as shards into
    `out_dir`. Keys are the input positions, so skipping one sample renames no other."""
    report = PrepareReport()
    jobs = ((raw, i, max_image_pixels) for i, raw in enumerate(samples))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = _ordered_map(pool, jobs) if pool else map(_validate, jobs)
        with ShardWriter(out_dir, samples_per_shard) as writer:
            for source, sample, reason, converted in results:
                if sample is None:
                    report.skipped.append((source, reason))
                    continue
                writer.write(sample)
                report.converted += int(converted)
        report.written = writer.written
        report.shards = writer.shard_paths
    finally:
        if pool:
            pool.terminate()
    return report


def _ordered_map(pool, jobs: Iterator, window: int = 4096) -> Iterator:
    """pool.imap over bounded windows: imap alone would pull the whole (possibly huge) input
    into its task queue. Order is kept, so shards are identical for any worker count."""
    while True:
        chunk = list(itertools.islice(jobs, window))
        if not chunk:
            return
        yield from pool.imap(_validate, chunk, chunksize=16)


def iter_inputs(path: str, image_column: str | None = None, caption_column: str | None = None,
                caption_key: str = "") -> Iterator[RawSample]:
    """Samples of a folder (images + same-named .txt, optional .json), shards (a folder of
    them, one, a glob, a brace pattern or a comma list; .tar.gz too) or a table file."""
    tars = input_shards(path)
    if tars is not None:
        yield from _iter_shards(tars, caption_key)
    elif os.path.isdir(path):
        yield from _iter_folder(path, caption_key=caption_key)
    elif os.path.isfile(path):
        yield from _iter_table(path, image_column, caption_column)
    else:
        raise FileNotFoundError(f"input {path} does not exist: give a folder, a .tar shard or a "
                                "table file")


def _has_images(root: str) -> bool:
    return any(os.path.splitext(p)[1].lower() in IMAGE_EXTS
               for p in glob.iglob(os.path.join(root, "**", "*"), recursive=True))


def input_shards(path: str) -> list[str] | None:
    """The tars `path` names when it names shards (see shard_spec.py; compressed ones too),
    else None (a folder of images or a table)."""
    if os.path.isdir(path):
        return None if _has_images(path) else _tars_in(path)
    if os.path.isfile(path):
        return [path] if _is_tar(path) else None
    tars = [found for part in split_outside_braces(path) for pattern in expand_braces(part)
            for found in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])]
    missing = [tar for tar in tars if not os.path.isfile(tar)]
    if not tars or missing or not all(_is_tar(tar) for tar in tars):
        return None  # iter_inputs names what does not exist
    return tars


def _is_tar(path: str) -> bool:
    return path.lower().endswith((".tar",) + COMPRESSED_SUFFIXES)


def _tars_in(root: str) -> list[str]:
    """Flat, as img2dataset writes; compressed tars too (training needs them unpacked)."""
    tars = sorted(p for p in glob.glob(os.path.join(glob.escape(root), "*")) if _is_tar(p))
    if not tars:
        raise ValueError(f"input folder {root} holds no images ({', '.join(IMAGE_EXTS)}) and "
                         "no .tar shards: point --input at the images or the shards")
    return tars


def _iter_shards(tars: list[str], caption_key: str) -> Iterator[RawSample]:
    """Samples of existing webdataset shards (caption option checked on the first sample). A
    cut or unreadable shard keeps its complete samples and is listed in the skip report as
    `cut_shard`, named; the job goes on with the next shard."""
    cuts: list[ShardCutError] = []
    for tar, sample in iter_shards_checked(tars, caption_key, on_cut=cuts.append):
        yield from _cut_entries(cuts)
        yield _shard_raw_sample(tar, sample, caption_key)
    yield from _cut_entries(cuts)


def _cut_entries(cuts: list[ShardCutError]) -> Iterator[RawSample]:
    while cuts:
        cut = cuts.pop(0)
        warn_cut(cut)
        yield RawSample(source=f"{cut.shard} (after {cut.complete} complete samples)",
                        skip_reason="cut_shard")


def _shard_raw_sample(tar: str, sample: Sample, caption_key: str) -> RawSample:
    source = f"{os.path.basename(tar)}:{sample.key}"
    # The stored bytes, not the lenient `sample.caption`: check_caption must see a caption
    # that is not UTF-8 to skip it.
    caption: bytes | str | None = sample.caption_bytes if sample.has_txt else None
    if caption_key:
        issue, found = candidates_in(sample.meta, caption_key)
        if issue != Issue.OK:
            return RawSample(source=source, skip_reason=issue.metric_name)
        caption = found[0]  # the .json (kept as the sidecar) still holds every candidate
    if not sample.jpeg:
        return RawSample(source=source, skip_reason="missing_image")
    return RawSample(source=source, image=sample.jpeg, caption=caption, meta=sample.meta)


def _iter_folder(root: str, read: bool = True, caption_key: str = "") -> Iterator[RawSample]:
    files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if os.path.splitext(p)[1].lower() in IMAGE_EXTS and os.path.isfile(p))
    for image_path in files:
        if not read:
            yield RawSample(source=image_path, image_path=image_path)
            continue
        stem = os.path.splitext(image_path)[0]
        caption = _read_optional(stem + ".txt")
        meta_bytes = _read_optional(stem + ".json")
        meta = None
        if meta_bytes:
            try:
                meta = json.loads(meta_bytes)
            except ValueError:
                meta = None
        meta = meta if isinstance(meta, dict) else None
        if caption_key:
            issue, found = candidates_in(meta, caption_key)
            caption = found[0] if issue == Issue.OK else None
        yield RawSample(source=os.path.relpath(image_path, root), image_path=image_path,
                        caption=caption, meta=meta)


def _read_optional(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _iter_table(path: str, image_column: str | None,
                caption_column: str | None) -> Iterator[RawSample]:
    rows = _read_table(path)
    base = os.path.dirname(os.path.abspath(path))
    first = next(rows, None)
    if first is None:
        return
    image_key = _pick_column(path, first, image_column, IMAGE_COLUMNS, "--image-column")
    caption_key = _pick_column(path, first, caption_column, CAPTION_COLUMNS, "--caption-column")
    for row_number, row in enumerate(_chain(first, rows), start=1):
        ref = str(row.get(image_key) or "").strip()
        source = f"row {row_number}: {ref}"
        caption = row.get(caption_key)
        caption = None if caption is None else str(caption)
        if "://" in ref:
            yield RawSample(source=source, skip_reason="url_not_supported")
            continue
        if not ref:
            yield RawSample(source=source, skip_reason="missing_image")
            continue
        image_path = ref if os.path.isabs(ref) else os.path.join(base, ref)
        if not os.path.isfile(image_path):
            yield RawSample(source=source, skip_reason="missing_image")
            continue
        yield RawSample(source=source, image_path=image_path, caption=caption)


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _read_table(path: str) -> Iterator[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv"):
        # surrogateescape keeps undecodable bytes so the row, not the file, is rejected.
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            yield from csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
    elif ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise RuntimeError("reading parquet needs pyarrow: "
                               "pip install pyarrow==26.0.1") from err
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"input {path} has unknown type {ext!r}: use a .tar shard (or a folder "
                         "of them), a .csv, .tsv, .jsonl or .parquet table, or a folder of "
                         "images with .txt captions")


def _pick_column(path: str, row: dict, wanted: str | None, candidates: tuple[str, ...],
                 flag: str) -> str:
    if wanted is not None:
        if wanted not in row:
            raise ValueError(f"table {path} has no column {wanted!r} (columns: {sorted(row)})")
        return wanted
    for name in candidates:
        if name in row:
            return name
    raise ValueError(f"table {path}: none of the columns {sorted(row)} is one of {candidates}; "
                     f"name the column with {flag}")


def input_fingerprint(path: str, samples_per_shard: int, max_image_pixels: int,
                      caption_key: str = "") -> str:
    """Digest of everything the output depends on: the input files' names, sizes and mtimes and
    the settings. Equal digests mean a re-run would write identical shards."""
    digest = hashlib.sha256(
        f"{_FORMAT_VERSION} {samples_per_shard} {max_image_pixels} {caption_key}".encode())
    tars = input_shards(path)
    if tars is not None:
        files = tars
    elif os.path.isdir(path):  # images and their sidecars only: an output dir inside is ignored
        files = []
        for sample in _iter_folder(path, read=False):
            stem = os.path.splitext(sample.image_path)[0]
            files += [sample.image_path, stem + ".txt", stem + ".json"]
    else:
        files = [path] + sorted({s.image_path for s in _iter_table_lenient(path) if s.image_path})
    for name in files:
        if os.path.isfile(name):
            st = os.stat(name)
            digest.update(f"{os.path.relpath(name, path)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _iter_table_lenient(path: str) -> Iterator[RawSample]:
    try:
        yield from _iter_table(path, None, None)
    except ValueError:
        return


def prepare_shards(input_path: str, out_dir: str, samples_per_shard: int = 1000,
                   max_image_pixels: int = 40_000_000, workers: int = 1,
                   image_column: str | None = None, caption_column: str | None = None,
                   caption_key: str = "") -> PrepareReport:
    """Folder/table/shards -> shards in out_dir, with skipped.tsv and manifest.json.
    Idempotent. Raises ValueError naming the input and the fix when it holds no samples."""
    if os.path.isdir(input_path) and os.path.abspath(out_dir) == os.path.abspath(input_path):
        raise ValueError(f"--output {out_dir} is the input folder: write the shards elsewhere")
    fingerprint = input_fingerprint(input_path, samples_per_shard, max_image_pixels, caption_key)
    previous = read_manifest(out_dir)
    if previous and previous.get("fingerprint") == fingerprint and all(
            os.path.isfile(os.path.join(out_dir, s)) for s in previous["shards"]):
        return PrepareReport(written=previous["written"], up_to_date=True,
                             converted=previous.get("converted", 0),
                             skipped=[tuple(x) for x in previous["skipped"]],
                             shards=[os.path.join(out_dir, s) for s in previous["shards"]])
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as tmp:
        report = write_samples(iter_inputs(input_path, image_column, caption_column,
                                           caption_key),
                               tmp, samples_per_shard, max_image_pixels, workers)
        if report.written == 0 and not report.skipped:
            raise ValueError(f"input {input_path} holds no samples: a folder needs image files "
                             f"({', '.join(IMAGE_EXTS)}) with same-named .txt captions, a table "
                             "needs rows, a shard needs KEY.jpg/png/webp entries")
        _remove_manifest(out_dir)  # from here on the directory is "incomplete" until it returns
        for stale in glob.glob(os.path.join(out_dir, "shard-*")):
            os.remove(stale)
        for name in sorted(os.listdir(tmp)):
            shutil.move(os.path.join(tmp, name), os.path.join(out_dir, name))
    report.shards = [os.path.join(out_dir, os.path.basename(s)) for s in report.shards]
    write_report(out_dir, report, fingerprint)
    return report


def write_report(out_dir: str, report: PrepareReport, fingerprint: str) -> None:
    """skipped.tsv (source, reason) and manifest.json, the latter last: it marks completion."""
    with open(os.path.join(out_dir, SKIP_REPORT), "w", encoding="utf-8",
              errors="backslashreplace") as f:
        f.write("source\treason\n")
        for source, reason in report.skipped:
            f.write(f"{source}\t{reason}\n")
    manifest = {"fingerprint": fingerprint, "written": report.written,
                "converted": report.converted, "skipped_by_reason": report.reasons(),
                "skipped": report.skipped,
                "shards": [os.path.basename(s) for s in report.shards]}
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def read_manifest(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _remove_manifest(out_dir: str) -> None:
    try:
        os.remove(os.path.join(out_dir, MANIFEST))
    except FileNotFoundError:
        pass


__all__ = ["RawSample", "PrepareReport", "write_samples", "iter_inputs", "prepare_shards",
           "input_fingerprint", "read_manifest", "write_report", "MANIFEST", "SKIP_REPORT"]
