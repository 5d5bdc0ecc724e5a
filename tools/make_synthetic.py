"""Build (or reuse) the synthetic shapes dataset: train/val shards and its tokenizer.

    python tools/make_synthetic.py --cache-dir DIR [--num-train N] [--num-val N]
                                   [--image-size PX] [--seed S] [--vocab-size V]

Prints the train/val shard folders and the tokenizer path (see ov2_megatron/data/synthetic.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov2_megatron.data.synthetic import ensure_synthetic_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dataset = ensure_synthetic_dataset(args.cache_dir, args.num_train, args.num_val,
                                       args.image_size, args.seed, args.vocab_size,
                                       args.samples_per_shard)
    print(f"train: {dataset.train_dir}")
    print(f"val: {dataset.val_dir}")
    print(f"tokenizer: {dataset.tokenizer_model}")
    print(f"ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
