"""Train the caption SentencePiece model from shard captions.

    python tools/train_tokenizer.py --shards DIR_OR_GLOB --output PREFIX [--vocab-size N]

Writes PREFIX.model and PREFIX.vocab (ids PAD=0 UNK=1 BOS=2 EOS=3) and prints the vocabulary
size and the padded size the model will allocate (a fixed multiple, the same at any TP).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov2_megatron.data.config import resolve_shard_spec  # noqa: E402
from ov2_megatron.data.shards import iter_shard  # noqa: E402
from ov2_megatron.config import DecoderConfig, padded_vocab_size  # noqa: E402
from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer  # noqa: E402


def shard_captions(shards: list[str]):
    for shard in shards:
        for sample in iter_shard(shard, with_images=False):
            yield sample.caption


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="shard directory, glob or comma list")
    parser.add_argument("--output", required=True, help="output prefix (PREFIX.model)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="upper bound on pieces (the reference uses 32000 after padding)")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--max-captions", type=int, default=2_000_000,
                        help="train on at most this many captions (SentencePiece keeps "
                        "them in memory)")
    args = parser.parse_args(argv)
    try:
        shards = resolve_shard_spec(args.shards)
    except (FileNotFoundError, ValueError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = train_tokenizer(shard_captions(shards), args.output, args.vocab_size,
                           model_type=args.model_type, max_sentences=args.max_captions)
    tokenizer = CaptionTokenizer.from_file(path)
    # The model pads to a fixed multiple (decoder.vocab_pad_multiple), whatever the TP size,
    # so checkpoints move between layouts; set decoder.vocab_size to the size printed here.
    multiple = DecoderConfig.vocab_pad_multiple
    padded = padded_vocab_size(tokenizer.vocab_size, multiple)
    print(f"model: {path}")
    print(f"vocab size: {tokenizer.vocab_size} (the model pads it to {padded}: "
          f"decoder.vocab_pad_multiple={multiple})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
