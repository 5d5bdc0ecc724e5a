"""Caption image files with a checkpoint's encoder and caption decoder.

    python tools/caption.py --checkpoint RUN_DIR --images photo.jpg more/ [--beam 4]
    python tools/convert_checkpoint.py export-decoder --checkpoint RUN_DIR --output dec/
    python tools/caption.py --checkpoint RUN_DIR --decoder dec/ --images photos/ --output c.jsonl

The checkpoint may have been written at any TP/PP layout: it is read unsharded through the
conversion path (ov2_megatron/conversion/megatron_checkpoint.py), its encoder gives the patch
tokens (encode()), and the caption decoder runs as a plain PyTorch module
(conversion/caption_decoder_export.py): the checkpoint's own, or an exported one (--decoder).
Images go through the one evaluation transform (ov2_megatron/data/preprocess.py, --resize).
Greedy decoding by default; --beam N > 1 runs beam search (conversion/caption_search.py).
Each caption is printed with its log-probability; --output FILE.jsonl also writes
{"image", "caption", "ids", "log_prob"} per image. Captions are decoded with the run's
data.tokenizer_model (or --tokenizer); without one the token ids are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ov2_megatron.upstream_warnings import quiet_upstream_notices

quiet_upstream_notices()  # module level: spawned ranks import this file too


def build_parser() -> argparse.ArgumentParser:
    from ov2_megatron.conversion import checkpoint_tool_parser

    parser = checkpoint_tool_parser(__doc__, "run dir, its checkpoints/ dir, or a step dir "
                                    "(any TP/PP)", batch_size=8)
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files and/or directories (searched recursively)")
    parser.add_argument("--decoder", help="exported decoder directory (default: the "
                                          "checkpoint's own decoder)")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy, default)")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the run's)")
    parser.add_argument("--output", help="FILE.jsonl to write the captions to")
    return parser


def image_paths(entries: list[str]) -> list[str]:
    from ov2_megatron.conversion import ConversionError
    from ov2_megatron.conversion.feature_extraction import IMAGE_EXTENSIONS

    paths = []
    for entry in entries:
        if os.path.isdir(entry):
            paths += sorted(os.path.join(root, name) for root, _, names in os.walk(entry)
                            for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(entry):
            paths.append(entry)
        else:
            raise ConversionError(f"--images {entry}: no such file or directory")
    if not paths:
        raise ConversionError(f"--images {' '.join(entries)}: no images found")
    return paths


def keep_for(run, geom, index):
    """[b] image positions -> [b, k] patches the decoder reads: every patch, or the
    evaluation draw where learned decoder positions need exactly the training count."""
    import torch

    from ov2_megatron.models.token_drop import keep_indices

    if run.model.decoder.pos_embed == "learned" or run.train.eval_token_drop:
        return keep_indices(index, geom.num_patches, geom.num_kept, run.train.seed)
    return torch.arange(geom.num_patches).expand(len(index), -1)


def caption_images(args):
    """(one result per image, the run's tokenizer or None), the tokenizer checked against
    the checkpoint before any caption is generated."""
    import numpy as np
    import torch
    from PIL import Image

    from ov2_megatron.conversion import ConversionError, caption_decoder_export, caption_search
    from ov2_megatron.conversion import megatron_checkpoint
    from ov2_megatron.data import preprocess

    if args.batch_size < 1:
        raise ConversionError(f"--batch-size {args.batch_size} must be >= 1")
    paths = image_paths(args.images)
    step_dir, run, chunk, geom, device = megatron_checkpoint.load_for_inference(
        args.checkpoint, args.config, args.device)
    tokenizer = _tokenizer(args, step_dir, run)
    if args.decoder:
        decoder = caption_decoder_export.load(args.decoder)
    else:
        standard = megatron_checkpoint.standard_of(chunk, run, geom, step_dir)
        decoder = caption_decoder_export.from_standard(standard, run, geom)
    decoder.to(device)
    transform = preprocess.from_run(run, resize=args.resize)
    results = []
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start:start + args.batch_size]
        pixels = []
        for path in batch:
            try:
                with Image.open(path) as image:
                    pixels.append(transform(image))
            except OSError as error:
                raise ConversionError(f"{path}: cannot decode the image ({error})") from None
        with torch.no_grad():
            patches, _ = chunk.encode(torch.from_numpy(np.stack(pixels)).to(device))
        keep = keep_for(run, geom, torch.arange(start, start + len(batch))).to(device)
        image_tokens = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        if args.beam == 1:
            ids = caption_search.greedy(decoder, image_tokens)
        else:
            ids, _ = caption_search.beam_search(decoder, image_tokens, args.beam)
        scores = caption_search.sequence_log_prob(decoder, image_tokens, ids)
        for path, row, score in zip(batch, ids.tolist(), scores.tolist()):
            results.append(dict(image=path, ids=row, log_prob=score))
    return results, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ov2_megatron.conversion import ConversionError, pin_device

    pin_device(args.device)
    from ov2_megatron.conversion.atomic_output import staged_file

    try:
        results, tokenizer = caption_images(args)
        for result in results:
            result["caption"] = (tokenizer.decode(result["ids"]) if tokenizer
                                 else " ".join(map(str, result["ids"])))
            print(f"{result['image']}: {result['caption']} "
                  f"(log p = {result['log_prob']:.3f})")
        if args.output:
            with staged_file(args.output) as staging, open(staging, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in results)
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _tokenizer(args, step_dir: str, run):
    """The run's SentencePiece model (or --tokenizer), or None when there is none; refused
    when the checkpoint records another one (ids would decode to other words)."""
    from ov2_megatron.data.tokenizer import CaptionTokenizer
    from ov2_megatron.training import checkpoint, run_checks

    path = args.tokenizer or run.data.tokenizer_model
    if not (path and os.path.isfile(path)):
        return None
    saved = checkpoint.read_meta(step_dir).get("tokenizer")
    field = "--tokenizer" if args.tokenizer else "the run's data.tokenizer_model"
    fix = f"--tokenizer {saved['path']}" if saved else ""
    run_checks.check_same_tokenizer(saved, run_checks.tokenizer_identity(path),
                                    f"the checkpoint {step_dir}", field, fix)
    return CaptionTokenizer.from_file(path)


if __name__ == "__main__":
    sys.exit(main())
