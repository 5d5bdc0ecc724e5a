"""Train the caption SentencePiece model from shard captions.

    python tools/train_tokenizer.py --shards DIR_OR_GLOB --output PREFIX [--vocab-size N]
                                    [--caption-key FIELD]

Shards are any webdataset tars (these tools' or img2dataset's); --caption-key reads captions
from that .json field instead of .txt, as data.caption_key does (every candidate of a list is
a training sentence).

Writes PREFIX.model and PREFIX.vocab (ids PAD=0 UNK=1 BOS=2 EOS=3) and prints the vocabulary
size and the padded size the model will allocate (a fixed multiple, the same at any TP).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov2_megatron.data.captions import candidates_in  # noqa: E402
from ov2_megatron.data.config import resolve_shard_spec  # noqa: E402
from ov2_megatron.data.sample_checks import Issue  # noqa: E402
from ov2_megatron.data.shards import iter_shards_checked  # noqa: E402
from ov2_megatron.recipes import vocab_rule  # noqa: E402
from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer  # noqa: E402


def shard_captions(shards: list[str], caption_key: str = ""):
    """Captions of `shards`; raises ValueError (one line, naming the shard and the fix) when
    the first sample shows the caption option does not fit the shards."""
    for _, sample in iter_shards_checked(shards, caption_key, with_images=False):
        if not caption_key:
            yield sample.caption
            continue
        issue, found = candidates_in(sample.meta, caption_key)
        if issue == Issue.OK:
            yield from found


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
    parser.add_argument("--caption-key", default="",
                        help="read captions from this .json field (e.g. re_caption, "
                        "meta.caption) instead of .txt")
    args = parser.parse_args(argv)
    try:
        shards = resolve_shard_spec(args.shards)
        path = train_tokenizer(shard_captions(shards, args.caption_key), args.output,
                               args.vocab_size, model_type=args.model_type,
                               max_sentences=args.max_captions)
    except (OSError, ValueError, tarfile.TarError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = CaptionTokenizer.from_file(path)
    print(f"model: {path}")
    print(vocab_rule(tokenizer.vocab_size))  # the recipes' own rule (recipes.vocab_rule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
