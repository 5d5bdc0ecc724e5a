"""Encoder features of a checkpoint, batched, with a progress bar.

    python tools/extract_features.py --checkpoint DIR --images DIR --output feats.npy
    python tools/extract_features.py --checkpoint DIR --shards 'data/*.tar' --output f.safetensors
    python tools/extract_features.py --checkpoint DIR --pixels x.npy --output feats.npy

--pixels takes already-normalised float32 [N, 3, H, W] arrays (H, W any multiple of the patch)
and bypasses preprocessing, so exported models can be compared exactly. Images and shards go
through the one evaluation transform (ov2_megatron/data/preprocess.py, --resize), which the
exports' image-processor configs declare too. Features are those of
the model's encode(), as the official ViT returns them: patch tokens [N, patches, width], the
raw output of the last block without CLS and registers (no LayerNorm; what the caption decoder
was trained on; --features patch, the default), or the pooled feature [N, width] = LayerNorm
of the mean patch token (--features pooled); a .safetensors output holds both. Runs on the GPU
when there is one (--device to choose).
"""

from __future__ import annotations

import argparse
import sys

from ov2_megatron.upstream_warnings import quiet_upstream_notices
quiet_upstream_notices()  # module level: spawned ranks import this file too


def build_parser() -> argparse.ArgumentParser:
    from ov2_megatron.conversion import checkpoint_tool_parser

    parser = checkpoint_tool_parser(__doc__, "run dir, its checkpoints/ dir, or a step dir",
                                    batch_size=32)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="directory of images (searched recursively)")
    source.add_argument("--shards", help="webdataset shards: glob, directory or comma list")
    source.add_argument("--pixels", help=".npy of normalised float32 [N, 3, H, W]")
    parser.add_argument("--output", required=True, help="FILE.npy or FILE.safetensors")
    parser.add_argument("--features", choices=("patch", "pooled"), default="patch",
                        help="what a .npy output holds (default: patch tokens)")
    parser.add_argument("--image-size", type=int,
                        help="preprocessing resolution (default: the model's vision.image_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ov2_megatron.conversion import pin_device

    pin_device(args.device)
    from ov2_megatron.conversion import ConversionError, feature_extraction, megatron_checkpoint
    from ov2_megatron.data import preprocess

    try:
        if args.batch_size < 1:
            raise ConversionError(f"--batch-size {args.batch_size} must be >= 1")
        step_dir, run, chunk, _, device = megatron_checkpoint.load_for_inference(
            args.checkpoint, args.config, args.device)
        transform = preprocess.from_run(run, args.image_size, args.resize)
        if args.pixels:
            source = feature_extraction.pixel_source(args.pixels, run.model.vision.in_channels)
        elif args.images:
            source = feature_extraction.image_source(args.images, transform)
        else:
            source = feature_extraction.shard_source(args.shards, transform)
        shapes = feature_extraction.extract(chunk, source, args.output, args.features,
                                            args.batch_size, device,
                                            progress=not args.no_progress)
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{step_dir} -> {args.output} " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
