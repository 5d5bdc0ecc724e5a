"""Write validated webdataset shards (+ DALI index files) from images with captions.

    python tools/prepare_shards.py --input PATH --output DIR [--samples-per-shard N]
                                   [--caption-key FIELD]

PATH is a folder (image files with same-named .txt captions, optional .json metadata), a table
(.csv, .tsv, .jsonl, .parquet) with an image-path column and a caption column (relative paths
are resolved against the table's folder), or existing webdataset shards: one .tar or a folder
of them, as img2dataset writes (JPEG, PNG or WebP images). --caption-key FIELD takes the
caption from that field of each sample's .json instead of its .txt (dots walk into nested
objects, a list keeps its first candidate; the same meaning as data.caption_key).

Every image is decoded once; unusable samples (corrupt, truncated, not an image, empty file,
oversized, missing/empty/non-UTF-8 caption) are skipped and listed with their reason in
DIR/skipped.tsv. Re-running with unchanged inputs does
nothing. The last line printed is `written: N skipped: M`; the exit code is 0 when N > 0.

    python tools/prepare_shards.py --resize SHORT_SIDE --input SHARDS --output DIR
                                   [--quality Q] [--workers N]

writes a stage-1 copy of existing shards (a .tar, a folder, a glob, a brace pattern or a comma
list): the same shard names, keys, order and non-image members, each image's shorter side at
SHORT_SIDE (never upscaled), with DALI indexes. Parallel over shards, resumable after a kill;
what it changes for the augmentation: ov2_megatron/data/resize_shards.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov2_megatron.data.prepare import SKIP_REPORT, prepare_shards  # noqa: E402
from ov2_megatron.data.resize_shards import (ResizeSettings, ShardResult,  # noqa: E402
                                             resize_shards)

# Options of the prepare mode that a resized copy does not take: it keeps every member as is.
_PREPARE_ONLY = ("samples_per_shard", "image_column", "caption_column", "caption_key")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True,
                        help="folder of images + .txt, a table file, or .tar shard(s)")
    parser.add_argument("--output", required=True, help="directory for shard-*.tar/.idx")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="default 1000")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images (output is identical for any count)")
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000,
                        help="skip images larger than this (width * height)")
    parser.add_argument("--image-column", default=None, help="table column with image paths")
    parser.add_argument("--caption-column", default=None, help="table column with captions")
    parser.add_argument("--caption-key", default=None,
                        help="read the caption from this .json field (e.g. re_caption, "
                        "meta.caption) instead of .txt")
    parser.add_argument("--resize", type=int, metavar="SHORT_SIDE", default=None,
                        help="write a copy of the --input shards with each image's shorter "
                        "side at SHORT_SIDE px (stage 1: 96-128)")
    parser.add_argument("--quality", type=int, default=None,
                        help="with --resize: JPEG quality of the resized images (default 90)")
    args = parser.parse_args(argv)
    if args.resize is not None:
        return _resize_main(args)
    if args.quality is not None:
        print("error: --quality applies to --resize only", file=sys.stderr)
        return 2
    spp = 1000 if args.samples_per_shard is None else args.samples_per_shard
    try:
        report = prepare_shards(args.input, args.output, spp,
                                args.max_image_pixels, args.workers,
                                args.image_column, args.caption_column, args.caption_key or "")
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        print("written: 0 skipped: 0")
        return 2
    if report.up_to_date:
        print(f"up to date: inputs unchanged since the last run into {args.output}")
    for reason, count in sorted(report.reasons().items()):
        print(f"skipped {reason}: {count}")
    if report.converted:
        print(f"re-encoded to JPEG: {report.converted}")
    print(f"shards: {len(report.shards)} in {args.output}; skip report: "
          f"{os.path.join(args.output, SKIP_REPORT)}")
    print(f"written: {report.written} skipped: {len(report.skipped)}")
    return 0 if report.written > 0 else 1


def _resize_main(args: argparse.Namespace) -> int:
    given = [name for name in _PREPARE_ONLY if getattr(args, name) is not None]
    settings = ResizeSettings(args.resize, 90 if args.quality is None else args.quality,
                              args.max_image_pixels)
    try:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} does not apply with --resize: "
                             "the copy keeps the shards' samples and members as they are")
        with _Progress() as progress:
            report = resize_shards(args.input, args.output, settings, args.workers, progress)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for reason, count in sorted(report.skipped().items()):
        print(f"skipped {reason}: {count}")
    print(f"shards: {len(report.shards)} in {args.output} "
          f"({sum(s.reused for s in report.shards)} complete from an earlier run)")
    print(f"resized: {report.total('resized')} kept at their size (<= {args.resize} px): "
          f"{report.total('kept_small')} skipped: {sum(report.skipped().values())}")
    return 0 if report.total("samples") > 0 else 1


class _Progress:
    """One tqdm bar over shards when tqdm is installed, else one line per finished shard."""

    def __enter__(self) -> "_Progress":
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(unit="shard", file=sys.stderr)
        self.done = 0
        return self

    def __call__(self, result: ShardResult, total: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.total = total
            self.bar.update()
            return
        what = "complete from an earlier run" if result.reused else (
            f"{result.resized} resized, {result.kept_small} kept, "
            f"{sum(result.skipped.values())} skipped")
        print(f"[{self.done}/{total}] {result.name}: {result.samples} samples ({what})",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
