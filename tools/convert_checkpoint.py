"""Checkpoint conversion: export to timm / Hugging Face, import OpenCLIP, consolidate.

    python tools/convert_checkpoint.py export-timm --checkpoint RUN_OR_CKPT_DIR --output DIR
    python tools/convert_checkpoint.py export-hf --checkpoint RUN_OR_CKPT_DIR --output DIR \
        [--hf-class vit]
    python tools/convert_checkpoint.py export-decoder --checkpoint RUN_OR_CKPT_DIR --output DIR
    python tools/convert_checkpoint.py import-openclip --input DIR --output RUN_DIR --tp N --pp M
    python tools/convert_checkpoint.py consolidate --checkpoint RUN_OR_CKPT_DIR --output FILE.pt
    python tools/convert_checkpoint.py consolidate --input FILE.pt --output RUN_DIR --tp N --pp M

A checkpoint of any TP/PP layout is read through the run's config.json (two levels above the
step directory; --config to point elsewhere). Outputs are written under a temporary name and
renamed when complete; a mismatched or truncated input fails naming the file or tensor.
The formats and mapping decisions are documented in ov2_megatron/conversion/.
"""

from __future__ import annotations

import argparse
import os
import sys

from ov2_megatron.upstream_warnings import quiet_upstream_notices

# Conversion is CPU work (one gloo rank per shard): never touch a GPU, even where one exists.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
quiet_upstream_notices()  # module level: spawned ranks import this file too


def _read_tower(args):
    """The checkpoint's encoder at the export resolution: (step dir, VisionTower)."""
    from ov2_megatron.conversion import megatron_checkpoint, vision_tower
    from ov2_megatron.conversion.atomic_output import refuse_existing

    refuse_existing(args.output)  # before the (long) read
    step_dir, run = megatron_checkpoint.locate(args.checkpoint, args.config)
    standard, _ = megatron_checkpoint.read_standard(step_dir, run)
    return step_dir, vision_tower.from_standard(standard, run, args.image_size, args.resize)


def _report(step_dir: str, tower, output: str, what: str) -> None:
    print(f"{step_dir} -> {output} ({what}, {tower.image_size} px, {tower.depth} blocks of "
          f"width {tower.width}, {tower.num_registers} registers)")


def export_timm(args) -> None:
    from ov2_megatron.conversion import timm_format

    step_dir, tower = _read_tower(args)
    timm_format.export(tower, args.output)
    _report(step_dir, tower, args.output, "timm VisionTransformer")


def export_hf(args) -> None:
    from ov2_megatron.conversion import hf_format

    step_dir, tower = _read_tower(args)
    hf_format.export(tower, args.output, args.hf_class)
    _report(step_dir, tower, args.output, hf_format.model_class(tower, args.hf_class))
    print(f"features: {hf_format.feature_note(tower, args.hf_class)}")


def export_decoder(args) -> None:
    from ov2_megatron.conversion import caption_decoder_export, megatron_checkpoint
    from ov2_megatron.conversion.atomic_output import refuse_existing

    refuse_existing(args.output)  # before the (long) read
    step_dir, run = megatron_checkpoint.locate(args.checkpoint, args.config)
    standard, geom = megatron_checkpoint.read_standard(step_dir, run)
    spec = caption_decoder_export.export(standard, run, geom, args.output)
    print(f"{step_dir} -> {args.output} (caption decoder: {spec.depth} blocks of width "
          f"{spec.width}, vocabulary {spec.vocab_size}, reads {spec.encoder_width}-wide patch "
          f"tokens; tools/caption.py --decoder {args.output})")


def import_openclip(args) -> None:
    from ov2_megatron.conversion import megatron_checkpoint, openclip_format
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.conversion.atomic_output import refuse_existing
    from ov2_megatron.training.run_config import apply_overrides

    refuse_existing(args.output)
    vision = openclip_format.read(args.input)
    run = openclip_format.target_run(vision, get_recipe(args.recipe, args.stage), args.tp,
                                     args.pp)
    run = apply_overrides(run, args.set)
    step_dir = megatron_checkpoint.write_distributed(
        vision.standard, run, args.output, source=args.input, fresh=("decoder.",),
        note="imported from OpenCLIP; caption decoder freshly initialised")
    for note in vision.notes:
        print(f"note: {note}")
    sets = " ".join(f"--set {item}" for item in megatron_checkpoint.override_args(
        get_recipe(args.recipe, args.stage), run))
    print(f"{args.input} -> {step_dir} (TP={args.tp}, PP={args.pp}, {vision.pos_embed} "
          f"positions, LayerNorm eps {vision.layernorm_eps}). Continue training with:\n"
          f"  python -m ov2_megatron.train --recipe {args.recipe} --stage {args.stage} {sets}")


def consolidate(args) -> None:
    import torch

    from ov2_megatron.config import ParallelConfig
    from ov2_megatron.conversion import ConversionError, megatron_checkpoint
    from ov2_megatron.conversion.atomic_output import refuse_existing, staged_file

    if args.checkpoint:  # distributed -> one file
        step_dir, run = megatron_checkpoint.locate(args.checkpoint, args.config)
        standard, _ = megatron_checkpoint.read_standard(step_dir, run)
        config_out = sidecar_config(args.output)
        with staged_file(args.output) as weights, staged_file(config_out) as config:
            torch.save(standard, weights)
            with open(config, "w") as f:
                f.write(run.to_json())
        print(f"{step_dir} -> {args.output} ({len(standard)} tensors) + {config_out}")
        return
    if args.tp is None or args.pp is None:
        raise ConversionError("consolidate --input FILE.pt needs --tp and --pp (the layout to "
                              "write the distributed checkpoint at)")
    refuse_existing(args.output)
    config_path = args.config or sidecar_config(args.input)
    run = megatron_checkpoint.load_run_config(config_path)
    try:
        standard = torch.load(args.input, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{args.input}: cannot read the state dict "
                              f"({type(error).__name__}: {error}); truncated?") from None
    if not isinstance(standard, dict):
        raise ConversionError(f"{args.input}: not a state dict")
    run.parallel = ParallelConfig(tensor=args.tp, pipeline=args.pp, sequence_parallel=(
        run.parallel.sequence_parallel and args.tp > 1))
    step_dir = megatron_checkpoint.write_distributed(standard, run, args.output, args.input,
                                                     note="from a consolidated state dict")
    print(f"{args.input} -> {step_dir} (TP={args.tp}, PP={args.pp})")


def sidecar_config(weights_path: str) -> str:
    """model.pt -> model.config.json: the run config that goes with a consolidated file."""
    return os.path.splitext(weights_path)[0] + ".config.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, target in (
            ("export-timm", export_timm, "a timm VisionTransformer"),
            ("export-hf", export_hf, "a Hugging Face model (TimmWrapperModel by default)")):
        sub = commands.add_parser(name, help=f"distributed checkpoint -> {target}",
                                  description=f"A distributed checkpoint (any TP/PP) -> {target}: "
                                  "config.json + model.safetensors in OUTPUT.")
        sub.add_argument("--checkpoint", required=True,
                         help="run dir, its checkpoints/ dir, or a step dir")
        sub.add_argument("--output", required=True, help="new directory to write")
        sub.add_argument("--config", help="run config.json (default: the run dir's)")
        sub.add_argument("--image-size", type=int,
                         help="resolution to export the position table for (default: the "
                              "checkpoint's vision.image_size)")
        sub.add_argument("--resize", choices=("squash", "shortest"), default="squash",
                         help="evaluation resize the image-processor config declares: squash "
                              "(default, as the released OpenVision checkpoints) or shortest "
                              "(shorter side + centre crop); ov2_megatron/data/preprocess.py")
        if name == "export-hf":
            sub.add_argument(
                "--hf-class", choices=("timm_wrapper", "vit"), default="timm_wrapper",
                help="timm_wrapper (default): TimmWrapperModel, whose last_hidden_state and "
                     "pooler_output are the official features exactly; vit: ViTModel "
                     "(Dinov2WithRegistersModel with registers), whose last_hidden_state is "
                     "LayerNorm'd per token and pooler_output is LN(CLS): take "
                     "hidden_states[-1] there (see ov2_megatron/conversion/hf_format.py)")
        sub.set_defaults(func=func)
    sub = commands.add_parser(
        "export-decoder", help="distributed checkpoint -> the caption decoder on its own",
        description="The caption decoder of a distributed checkpoint (any TP/PP) -> "
                    "decoder_config.json + decoder.safetensors in OUTPUT, loaded by "
                    "ov2_megatron.conversion.caption_decoder_export.load (tools/caption.py "
                    "--decoder).")
    sub.add_argument("--checkpoint", required=True,
                     help="run dir, its checkpoints/ dir, or a step dir")
    sub.add_argument("--output", required=True, help="new directory to write")
    sub.add_argument("--config", help="run config.json (default: the run dir's)")
    sub.set_defaults(func=export_decoder)
    sub = commands.add_parser(
        "import-openclip", help="OpenCLIP ViT weights -> distributed checkpoint",
        description="open_clip_config.json + open_clip_pytorch_model.bin in INPUT -> a run dir "
                    "with config.json and a step-0 distributed checkpoint at TP/PP, ready to "
                    "continue training (the caption decoder is freshly initialised).")
    sub.add_argument("--input", required=True, help="directory with the OpenCLIP files")
    sub.add_argument("--output", required=True, help="new run directory to write")
    sub.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    sub.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    sub.add_argument("--recipe", default="vit_l14",
                     help="recipe for everything but the encoder's shape (default vit_l14)")
    sub.add_argument("--stage", type=int, default=2, help="recipe stage (default 2)")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="RunConfig override, e.g. train.steps=1000 (repeatable)")
    sub.set_defaults(func=import_openclip)
    sub = commands.add_parser(
        "consolidate", help="distributed checkpoint <-> one torch state dict",
        description="--checkpoint DIR --output FILE.pt: one plain torch state dict (standard "
                    "names, full tensors) + FILE.config.json. --input FILE.pt --output DIR "
                    "--tp N --pp M: back to a distributed checkpoint at that layout.")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="distributed checkpoint to consolidate")
    source.add_argument("--input", help="consolidated .pt file to distribute")
    sub.add_argument("--output", required=True, help="FILE.pt, or a new run directory")
    sub.add_argument("--config", help="run config.json (default: beside the input)")
    sub.add_argument("--tp", type=int, help="tensor-parallel size (with --input)")
    sub.add_argument("--pp", type=int, help="pipeline-parallel size (with --input)")
    sub.set_defaults(func=consolidate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ov2_megatron.conversion import ConversionError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
