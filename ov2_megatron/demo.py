"""`make demo`: the embedded default end to end on CPU, in a few minutes.

Draws the synthetic dataset and trains its tokenizer (first run only), trains `tiny_cpu`
stage 1 at 48 px, then stage 2 at 64 px starting from the stage-1 weights, and prints what
a person wants to see: the loss falling, generated captions next to the true ones, the
validation loss with the right images against the same captions with wrong images, and a
linear probe on the frozen encoder. Logs and checkpoints stay under runs/demo/.
Re-running resumes (a finished stage only re-evaluates).

    python -m ov2_megatron.demo [--output DIR] [--set KEY=VALUE ...]   # both stages get --set
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="stage1/ and stage2/ go here")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a run-config field in both stages")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from ov2_megatron.upstream_warnings import quiet_upstream_notices

    args = parse_args(argv)
    quiet_upstream_notices()
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.loop import train
    from ov2_megatron.training.run_config import apply_overrides

    started = time.monotonic()
    summaries = {}
    for stage in (1, 2):
        out = os.path.join(args.output, f"stage{stage}")
        overrides = [f"train.output_dir={out}", *args.overrides]
        if stage == 2:
            overrides.append(f"train.init_from={os.path.join(args.output, 'stage1')}")
        print(f"\n=== tiny_cpu stage {stage} -> {out} ===", flush=True)
        summaries[stage] = train(apply_overrides(get_recipe("tiny_cpu", stage), overrides))
        _shutdown()
    records = _metrics(os.path.join(args.output, "stage1"))
    losses = [r["loss"] for r in records if "loss" in r]
    final = {k: v for s in summaries.values() for k, v in s.items() if isinstance(v, float)}
    print("\n=== demo summary ===")
    print(f"stage 1 training loss: {losses[0]:.3f} at step 1 -> {losses[-1]:.3f} at the end")
    print(f"stage 2 validation caption loss: {summaries[2]['val_loss']:.3f} with the right "
          f"images vs {summaries[2]['val_loss_wrong_images']:.3f} with the wrong ones "
          f"(token accuracy {summaries[2]['val_token_accuracy']:.1%})")
    if "probe_shape_accuracy" in final:
        print(f"linear probe (frozen encoder, dominant attribute): shape "
              f"{final['probe_shape_accuracy']:.1%} (chance {final['probe_shape_chance']:.1%}), "
              f"colour {final['probe_colour_accuracy']:.1%} "
              f"(chance {final['probe_colour_chance']:.1%})")
    print(f"TensorBoard: tensorboard --logdir {args.output}; checkpoints in {args.output}/"
          f"stage*/checkpoints; {time.monotonic() - started:.0f} s in all")
    return 0


def _shutdown() -> None:
    """Release the process groups so the next stage initialises afresh."""
    from ov2_megatron.parallel.initialize import shutdown

    shutdown()


if __name__ == "__main__":
    sys.exit(main())
