"""The main job: `python -m ov2_megatron.train --recipe NAME [--stage 1|2] [--set k=v ...]`
(installed as `ov2-train`). One process per GPU (torchrun or srun), or one CPU process.

Keys for --set are dotted paths into the run config (see --help-keys), e.g.
    --set train.steps=100 --set train.output_dir=runs/try --set parallel.tensor=2
(a length in steps replaces the recipe's train.samples; train.lr replaces train.base_lr)
    --set parallel.sequence_parallel=true --set data.train_shards=/data/shards
Given data.train_shards, a run uses only your data: no synthetic set, validation on
data.val_shards (or a held-out training shard), model.decoder.vocab_size from the tokenizer.
Check a run, its data and a multi-GPU layout from a login node, without process groups:
    ov2-train --recipe vit_1b --dry-run --nodes 4 --gpus-per-node 8 --set data.train_shards=...
Re-running with the same train.output_dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ov2_megatron.upstream_warnings import quiet_upstream_notices


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ov2-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny_cpu", help="tiny_cpu, vit_l14 or vit_1b")
    parser.add_argument("--stage", type=int, default=1, help="1 (low resolution) or 2 (high)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate without process groups or compute: the config, the "
                        "layout, the shards, the tokenizer and vocabulary; print the resolved "
                        "config, layout and parameter count")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="--dry-run: plan the layout for N ranks (default: WORLD_SIZE or "
                        "SLURM_NTASKS, else 1)")
    parser.add_argument("--nodes", type=int, metavar="N",
                        help="--dry-run: plan for N nodes of --gpus-per-node GPUs each")
    parser.add_argument("--gpus-per-node", type=int, metavar="G", help="with --nodes")
    parser.add_argument("--help-keys", action="store_true", help="list every --set key")
    return parser.parse_args(argv)


def planned_world(args: argparse.Namespace) -> tuple[int, str]:
    """(world size, where it came from). A real run takes it from its launcher; the flags only
    plan a --dry-run, e.g. a multi-node layout checked from a login node."""
    if args.nodes is not None or args.gpus_per_node is not None:
        if args.nodes is None or args.gpus_per_node is None or args.world_size is not None:
            raise ValueError("give --nodes N together with --gpus-per-node G, or --world-size N")
        world, source = args.nodes * args.gpus_per_node, (
            f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node}")
    elif args.world_size is not None:
        world, source = args.world_size, "--world-size"
    else:
        for name in ("WORLD_SIZE", "SLURM_NTASKS"):
            if name in os.environ:
                return int(os.environ[name]), f"${name}"
        return 1, "a single process (no --world-size, WORLD_SIZE or SLURM_NTASKS)"
    if world < 1:
        raise ValueError(f"world size {world} from {source} must be >= 1")
    if not args.dry_run:
        raise ValueError(f"{source} only plans a --dry-run: a run takes its world size from "
                         "the launcher (torchrun, srun)")
    return world, source


# How to spell the values that are not plain numbers or strings.
_KEY_NOTES = {
    "synthetic": "--set synthetic=none switches it off; it is never built once "
                 "data.train_shards is given",
    "data.crop_scale": "as printed, (0.5,1.0), or 0.5,1.0",
    "data.crop_ratio": "as printed, (0.75,1.333), or 0.75,1.333",
    "model.decoder.vocab_size": "follows data.tokenizer_model unless set here (then it must "
                                "match the tokenizer)",
    "train.warmup_steps": "absolute (a run too short for it warms up over its first tenth, "
                          "said in the start line); a --set unsets warmup_samples/fraction",
    "train.steps": "a --set unsets train.samples (and the reverse)",
    "train.lr": "a --set unsets train.base_lr (and the reverse)",
}


def _keys(obj, prefix="") -> list[str]:
    out = []
    for field in dataclasses.fields(obj):
        value, key = getattr(obj, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            out += _keys(value, f"{key}.")
        elif key != "explicit":  # records the --set keys; not itself a setting
            note = f"    # {_KEY_NOTES[key]}" if key in _KEY_NOTES else ""
            out.append(f"{key} = {value!r}{note}")
    return out


def dry_run(run, world_size: int, world_source: str = "") -> None:
    from ov2_megatron.models.flops import train_flops_per_sample
    from ov2_megatron.training.data_coverage import coverage_lines
    from ov2_megatron.training.run_config import validate_run
    from ov2_megatron.variants import decoder_parameter_count, encoder_parameter_count

    notes = _dry_run_data(run, world_size)
    geom = validate_run(run, world_size)  # again: the vocabulary may follow the tokenizer
    vit, patch = run.model.vision.shape()
    encoder = encoder_parameter_count(vit, patch, run.model.vision.image_size,
                                      run.model.vision.in_channels, run.model.vision.class_token,
                                      geom.num_registers, run.model.vision.pos_embed == "learned")
    decoder = decoder_parameter_count(
        run.model.decoder.shape(), vit.width, geom.padded_vocab,
        geom.decoder_tokens if run.model.decoder.pos_embed == "learned" else 0)
    p = run.parallel
    print(run.to_json())
    source = f" (world size from {world_source})" if world_source else ""
    print(f"layout: world {world_size} = TP {p.tensor} x PP {p.pipeline} x DP "
          f"{world_size // (p.tensor * p.pipeline)}; VPP {p.virtual_pipeline}; SP "
          f"{p.sequence_parallel}{source}")
    for note in notes + coverage_lines(run):
        print(note)
    for line in _recipe_lines(run, geom):
        print(line)
    print(f"sequences: ViT {geom.vit_seq} ({geom.num_patches} patches + {geom.vit_prefix} "
          f"prefix + {geom.vit_seq - geom.vit_tokens} padding), decoder {geom.decoder_seq} "
          f"({geom.num_kept} kept + {geom.text_len} text + "
          f"{geom.decoder_seq - geom.decoder_tokens} padding)")
    for note in geom.notes:
        print(f"alignment: {note}")
    print(f"parameters: encoder {encoder:,}, decoder {decoder:,}, total {encoder + decoder:,}")
    print(f"train FLOPs per image: {train_flops_per_sample(run.model, geom, run.train.recompute):.3e}")


def _recipe_lines(run, geom) -> list[str]:
    """The schedule and optimizer as they will run, each with the rule that gave it, and the
    weight-decay mask and initialisation (what the official recipe fixes)."""
    from ov2_megatron.conversion.megatron_checkpoint import standard_shapes
    from ov2_megatron.models.parameter_kinds import mask_summary
    from ov2_megatron.training.run_config import length_rule, lr_rule, warmup_rule

    t = run.train
    decayed, undecayed = mask_summary(standard_shapes(run.model, geom))
    clip = (f"clip_grad {t.clip_grad}" if t.clip_grad else
            "clip_grad 0 (no clipping, as the official recipe)")
    return [f"schedule: {length_rule(t)}, {lr_rule(t)}, {warmup_rule(t)}, cosine to "
            f"{t.min_lr}",
            f"optimizer: AdamW betas ({t.beta1}, {t.beta2}), eps {t.eps}, {clip}",
            f"weight decay {t.weight_decay} x LR (the official mask: Dense/Conv weights) on: "
            + ", ".join(decayed),
            "no weight decay on: " + ", ".join(undecayed),
            f"initialisation: model.init {run.model.init}" +
            (" (each parameter kind as the official code: models/parameter_kinds.py)"
             if run.model.init == "official" else f", std {run.model.init_std}")]


def _dry_run_data(run, world_size: int) -> list[str]:
    """The data checks a run does at start-up, without its process groups: layout errors
    first (they need no files), then the shards, the tokenizer and the vocabulary."""
    from ov2_megatron.parallel.initialize import ParallelLayout
    from ov2_megatron.training import data_sources
    from ov2_megatron.training.run_config import validate_run

    notes = data_sources.choose_sources(run)
    validate_run(run, world_size)
    if run.synthetic:  # built by the run itself (minutes): only its numbers are checkable
        dataclasses.replace(run.data, train_shards="synthetic",
                            tokenizer_model="synthetic").validate()
        return notes + ["data: shards and tokenizer of the synthetic set are checked when the "
                        "run builds it"]
    if not data_sources.given(run.data.train_shards):
        return notes + ["data: NOT CHECKED: data.train_shards is empty; a run needs it "
                        "(tools/prepare_shards.py, then --set data.train_shards=...)"]
    dp_size = ParallelLayout(run.parallel.tensor, run.parallel.pipeline).data_parallel_size(
        world_size)
    from ov2_megatron.parallel.initialize import local_world_size

    gpus_per_node = min(local_world_size(world_size), 8)  # a plan: 8-GPU nodes by default
    return (notes + data_sources.check_data(run, dp_size) + data_sources.probe(run)
            + data_sources.loader_memory_check(run, world_size, gpus_per_node, refuse=False))


def _device_capability():
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.dry_run or args.help_keys):
        # Before torch and megatron are imported (seconds): from here on a stop signal sets
        # the flag that the training loop checks (process_lifetime), instead of killing.
        from ov2_megatron.training import process_lifetime

        process_lifetime.install_stop_handlers()
        process_lifetime.watch_launcher()
    quiet_upstream_notices()
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.run_config import apply_overrides

    try:
        run = apply_overrides(get_recipe(args.recipe, args.stage), args.overrides)
        if args.help_keys:
            print("\n".join(_keys(run)))
            return 0
        world, source = planned_world(args)
        if args.dry_run:
            dry_run(run, world, source)
            return 0
        from ov2_megatron.training.run_config import validate_run

        validate_run(run, world, _device_capability())  # before any process group or compute
    except (ValueError, OSError) as error:  # OSError: a missing or unreadable shard
        print(f"ov2-train: configuration error: {error}", file=sys.stderr)
        return 2
    if _stopped_before_start(world):
        return 0
    from ov2_megatron.training.loop import train  # torch, megatron: seconds

    if _stopped_before_start(world):
        return 0
    from ov2_megatron.data.bad_data import BadDataError

    try:
        summary = train(run)
    except (ValueError, OSError) as error:
        print(f"ov2-train: error: {error}", file=sys.stderr)
        return 2
    except BadDataError as error:  # raised on every rank at once (training/step.py)
        print(f"ov2-train: stopped by the data: {error}", file=sys.stderr, flush=True)
        return 3
    return 0 if summary else 1


def _stopped_before_start(world: int) -> bool:
    """A single process signalled while it started has nothing to save: it ends here, exit 0.
    Ranks of a larger run go on, agree at the first step end and checkpoint together (one
    rank leaving before the process groups form would leave the others waiting for it)."""
    from ov2_megatron.training import process_lifetime

    signum = process_lifetime.stop_signal()
    if signum is None or world != 1:
        return False
    print(f"ov2-train: {process_lifetime.signal_name(signum)} before training started: nothing "
          "to save; stopped (rerun the same command to start)", file=sys.stderr, flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
