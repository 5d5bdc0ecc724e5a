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
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov2_megatron.data.prepare import SKIP_REPORT, prepare_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True,
                        help="folder of images + .txt, a table file, or .tar shard(s)")
    parser.add_argument("--output", required=True, help="directory for shard-*.tar/.idx")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images (output is identical for any count)")
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000,
                        help="skip images larger than this (width * height)")
    parser.add_argument("--image-column", default=None, help="table column with image paths")
    parser.add_argument("--caption-column", default=None, help="table column with captions")
    parser.add_argument("--caption-key", default="",
                        help="read the caption from this .json field (e.g. re_caption, "
                        "meta.caption) instead of .txt")
    args = parser.parse_args(argv)
    try:
        report = prepare_shards(args.input, args.output, args.samples_per_shard,
                                args.max_image_pixels, args.workers,
                                args.image_column, args.caption_column, args.caption_key)
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


if __name__ == "__main__":
    sys.exit(main())
