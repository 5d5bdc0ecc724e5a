"""The main job: `python -m ov2_megatron.train --recipe NAME [--stage 1|2] [--set k=v ...]`
(installed as `ov2-train`). One process per GPU (torchrun or srun), or one CPU process.

Keys for --set are dotted paths into the run config (see --help-keys), e.g.
    --set train.steps=100 --set train.output_dir=runs/try --set parallel.tensor=2
    --set parallel.sequence_parallel=true --set data.train_shards=/data/shards
Re-running with the same train.output_dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ov2-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny_cpu", help="tiny_cpu, vit_l14 or vit_1b")
    parser.add_argument("--stage", type=int, default=1, help="1 (low resolution) or 2 (high)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the resolved config, layout and parameter count")
    parser.add_argument("--help-keys", action="store_true", help="list every --set key")
    return parser.parse_args(argv)


def _keys(obj, prefix="") -> list[str]:
    out = []
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out += _keys(value, f"{prefix}{field.name}.")
        else:
            out.append(f"{prefix}{field.name} = {value!r}")
    return out


def dry_run(run, world_size: int) -> None:
    from ov2_megatron.models.flops import train_flops_per_sample
    from ov2_megatron.training.run_config import validate_run
    from ov2_megatron.variants import decoder_parameter_count, encoder_parameter_count

    geom = validate_run(run, world_size)
    vit, patch = run.model.vision.shape()
    encoder = encoder_parameter_count(vit, patch, run.model.vision.image_size,
                                      run.model.vision.in_channels, run.model.vision.class_token,
                                      geom.num_registers, run.model.vision.pos_embed == "learned")
    decoder = decoder_parameter_count(
        run.model.decoder.shape(), vit.width, geom.padded_vocab,
        geom.decoder_tokens if run.model.decoder.pos_embed == "learned" else 0)
    p = run.parallel
    print(run.to_json())
    print(f"layout: world {world_size} = TP {p.tensor} x PP {p.pipeline} x DP "
          f"{world_size // (p.tensor * p.pipeline)}; VPP {p.virtual_pipeline}; SP "
          f"{p.sequence_parallel}")
    print(f"sequences: ViT {geom.vit_seq} ({geom.num_patches} patches + {geom.vit_prefix} "
          f"prefix + {geom.vit_seq - geom.vit_tokens} padding), decoder {geom.decoder_seq} "
          f"({geom.num_kept} kept + {geom.text_len} text + "
          f"{geom.decoder_seq - geom.decoder_tokens} padding)")
    for note in geom.notes:
        print(f"alignment: {note}")
    print(f"parameters: encoder {encoder:,}, decoder {decoder:,}, total {encoder + decoder:,}")
    print(f"train FLOPs per image: {train_flops_per_sample(run.model, geom, run.train.recompute):.3e}")


def _device_capability():
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _quiet_known_warnings() -> None:
    """Upstream notices that say nothing actionable about a run (printed once per rank)."""
    for pattern in (".*(Transformer Engine|Apex).*not installed.*", ".*full scope is deprecated.*",
                    ".*is deprecated. Please use `torch.distributed.*",
                    ".*The .grad attribute of a Tensor that is not a leaf.*",
                    ".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet_known_warnings()
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.run_config import apply_overrides

    try:
        run = apply_overrides(get_recipe(args.recipe, args.stage), args.overrides)
        if args.help_keys:
            print("\n".join(_keys(run)))
            return 0
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        if args.dry_run:
            dry_run(run, world)
            return 0
        from ov2_megatron.training.run_config import validate_run

        validate_run(run, world, _device_capability())  # before any process group or compute
    except (ValueError, FileNotFoundError) as error:
        print(f"ov2-train: configuration error: {error}", file=sys.stderr)
        return 2
    from ov2_megatron.training.loop import train

    try:
        summary = train(run)
    except (ValueError, FileNotFoundError) as error:
        print(f"ov2-train: error: {error}", file=sys.stderr)
        return 2
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
