"""SentencePiece captions: training, fixed-length batch encoding (the official layout), decoding.

Id layout of models trained here: PAD=0, UNK=1, BOS=2, EOS=3, so a zero-filled buffer is
already padding. A row of `encode_batch(captions, L)` is the official OpenVision 2 layout
(`my_bert_tokenize_v2(max_len=L, add_bos, add_eos)` in UCSC-VLAA/OpenVision):
    BOS p1 ... pk EOS PAD ... PAD | PAD       k <= L - 3
    `------- L - 1 slots -------'   one appended token (the official code appends [CLS])
The decoder reads tokens[:, :L-1] and predicts tokens[:, 1:] with PAD unsupervised, so the
last target is always PAD and at most L - 2 targets (k pieces and EOS) are supervised. The
previous layout here filled all L slots (up to L - 2 pieces, L - 1 supervised targets); the
official one keeps checkpoints and loss curves comparable with the reference.
Truncation keeps BOS and EOS and drops the caption's tail pieces (the official code forces
slot L - 2 to EOS when a caption overflows): every row ends its caption with EOS, so the
decoder always learns to stop and the loss always has an EOS target. A truncated caption
therefore looks like a complete shorter one; at the reference length of 128 that is rare
(captions are ~60-100 pieces) and the price of never training "don't stop".
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class CaptionTokenizer:
    """A loaded SentencePiece model with BOS/EOS/PAD handling for fixed-length caption batches."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str = ""):
        self._sp = processor
        self.path = path
        for name, value in (("bos", processor.bos_id()), ("eos", processor.eos_id()),
                            ("pad", processor.pad_id())):
            if value < 0:
                raise ValueError(f"tokenizer {path or '<memory>'} has no {name} piece: retrain it "
                                 "with tools/train_tokenizer.py (PAD=0 UNK=1 BOS=2 EOS=3)")
        if len({processor.bos_id(), processor.eos_id(), processor.pad_id()}) != 3:
            raise ValueError(f"tokenizer {path or '<memory>'} shares ids between BOS/EOS/PAD: the "
                             "loss mask needs PAD distinct from EOS; retrain it")

    @classmethod
    def from_file(cls, path: str) -> "CaptionTokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path} does not exist: train one with "
                                    "tools/train_tokenizer.py --shards ... --output PREFIX")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"tokenizer model {path} is not a SentencePiece model "
                             f"({err})") from err
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode_batch(self, captions: list[str], length: int) -> np.ndarray:
        """int32 [B, length] in the official layout (module docstring): BOS + at most
        length - 3 pieces + EOS in the first length - 1 slots, PAD after; the last slot is
        always PAD."""
        if length < 3:
            raise ValueError(f"caption length {length} cannot hold BOS, EOS and the appended "
                             "PAD: use >= 3")
        out = np.full((len(captions), length), self.pad_id, dtype=np.int32)  # [B, L]
        if not captions:
            return out
        # One C++ call for the whole batch; SentencePiece splits it over its own threads.
        pieces = self._sp.encode(captions, out_type=int)
        body = length - 3  # slots 0 .. L-2 hold BOS, pieces, EOS; slot L-1 is the appended PAD
        out[:, 0] = self.bos_id
        for row, ids in enumerate(pieces):
            ids = ids[:body]
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eos_id
        return out

    def fingerprint(self) -> str:
        """sha256 of the vocabulary: every id's piece, score and kind, in id order. Two
        tokenizers with the same fingerprint map text to the same ids; the .model file's bytes
        are no such identity (they also hold the trainer's input paths)."""
        sp, digest = self._sp, hashlib.sha256()
        for i in range(sp.get_piece_size()):
            kind = (sp.is_control(i), sp.is_unknown(i), sp.is_unused(i), sp.is_byte(i))
            digest.update(f"{sp.id_to_piece(i)}\t{sp.get_score(i)!r}\t{kind}\n".encode())
        return digest.hexdigest()

    def decode(self, ids) -> str:
        """Text of one row: stops at the first EOS, ignores BOS and PAD."""
        kept: list[int] = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.eos_id:
                break
            if token in (self.bos_id, self.pad_id):
                continue
            kept.append(int(token))
        return self._sp.decode(kept)


def train_tokenizer(captions: Iterable[str], out_prefix: str, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 2_000_000) -> str:
    """Train a SentencePiece model on `captions`; write `out_prefix.model` / `.vocab` atomically
    (trained in a temp dir, then renamed) and return the model path.

    BPE by default: on a small caption corpus (the synthetic set's ~40 words) SentencePiece's
    unigram trainer stops at ~60 mostly sub-word pieces (2x longer sequences), BPE learns every
    word as one piece. hard_vocab_limit is off so a tiny corpus never fails the training.
    """
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tok-") as tmp:
        corpus = os.path.join(tmp, "captions.txt")
        count = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for caption in captions:
                line = " ".join(caption.split())  # one caption per line: no embedded newlines
                if line:
                    f.write(line + "\n")
                    count += 1
                    if count >= max_sentences:
                        break
        if count == 0:
            raise ValueError("no non-empty captions to train the tokenizer on: check the shards "
                             "(captions only in KEY.json? pass --caption-key FIELD)")
        tmp_prefix = os.path.join(tmp, "tok")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            hard_vocab_limit=False, character_coverage=0.9995, num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            os.replace(tmp_prefix + ext, out_prefix + ext)
    return out_prefix + ".model"


__all__ = ["CaptionTokenizer", "train_tokenizer",
           "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]
