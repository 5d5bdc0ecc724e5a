"""SentencePiece caption tokenizer: ids, round trip, the official row layout (truncation,
exact fit, the appended PAD), bad models."""

import numpy as np
import pytest
import sentencepiece as spm

from ov2_megatron.data.synthetic import caption_of, draw_scene
from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer
from tests.data.shard_factory import synthetic_dataset

CORPUS = [
    "a dog runs across the green field",
    "two red apples on a wooden table",
    "the city skyline at night with bright lights",
    "a small boat on a calm blue lake, seen from the left",
    "ünïcödé captions: café, naïve, 東京 tower",
] * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "cap"), vocab_size=200)
    return CaptionTokenizer.from_file(path)


def test_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert 20 < tokenizer.vocab_size <= 200


def test_rows_match_sentencepiece_directly(tokenizer):
    reference = spm.SentencePieceProcessor(model_file=tokenizer.path)
    captions = sorted(set(CORPUS))
    rows = tokenizer.encode_batch(captions, 64)
    assert rows.dtype == np.int32 and rows.shape == (len(captions), 64)
    for caption, row in zip(captions, rows, strict=True):
        pieces = reference.encode(caption)
        assert len(pieces) <= 64 - 3
        expected = [2] + pieces + [3] + [0] * (64 - len(pieces) - 2)
        assert row.tolist() == expected
        assert tokenizer.decode(row) == caption  # round trip, including non-ASCII text


def test_truncation_keeps_bos_and_eos_and_the_last_pad(tokenizer):
    """Official layout: BOS + pieces + EOS padded to L - 1 slots, an overflow truncated with
    slot L - 2 forced to EOS, then the appended PAD."""
    caption = " ".join(CORPUS[:4])
    full = tokenizer.encode_batch([caption], 256)[0]
    n_pieces = int((full != 0).sum()) - 2
    length = 12
    assert n_pieces > length
    row = tokenizer.encode_batch([caption], length)[0]
    assert row[0] == 2 and row[length - 2] == 3 and row[length - 1] == 0
    assert row[1 : length - 2].tolist() == full[1 : length - 2].tolist()  # L - 3 pieces
    assert 0 not in row[:-1].tolist()
    assert caption.startswith(tokenizer.decode(row))


def test_exact_fit_is_l_minus_3_pieces(tokenizer):
    caption = "a dog runs across the green field"
    pieces = spm.SentencePieceProcessor(model_file=tokenizer.path).encode(caption)
    k = len(pieces)
    fit = tokenizer.encode_batch([caption], k + 3)[0]
    assert fit.tolist() == [2] + pieces + [3, 0]  # every slot used, the last one PAD
    assert tokenizer.decode(fit) == caption
    short = tokenizer.encode_batch([caption], k + 2)[0]
    assert short.tolist() == [2] + pieces[:-1] + [3, 0]  # one piece over: the tail goes


def test_last_slot_is_always_pad(tokenizer):
    captions = [" ".join(CORPUS[:5]), "a dog runs", "", CORPUS[3]]
    for length in (3, 4, 9, 40):
        rows = tokenizer.encode_batch(captions, length)
        assert (rows[:, -1] == 0).all() and (rows[:, 0] == 2).all()
        assert ((rows[:, :-1] == 3).sum(axis=1) == 1).all()  # one EOS in the first L - 1
        assert (rows[:, 1:] != 0).sum(axis=1).max() <= length - 2  # supervised targets


def test_decode_stops_at_eos_and_skips_pad_and_bos(tokenizer):
    row = tokenizer.encode_batch(["a dog runs"], 16)[0]
    garbage = tokenizer.encode_batch(["the city skyline"], 8)[0][1:4]
    tail = row.copy()
    eos_at = int(np.nonzero(row == 3)[0][0])
    tail[eos_at + 1 : eos_at + 4] = garbage  # content after EOS must be ignored
    assert tokenizer.decode(tail) == "a dog runs"
    assert tokenizer.decode([2, 0] + row[1:eos_at].tolist() + [0]) == "a dog runs"


def test_empty_batch_and_empty_caption(tokenizer):
    assert tokenizer.encode_batch([], 8).shape == (0, 8)
    assert tokenizer.encode_batch([""], 5)[0].tolist() == [2, 3, 0, 0, 0]
    assert tokenizer.encode_batch([""], 3)[0].tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="appended PAD"):
        tokenizer.encode_batch(["a dog"], 2)


def test_synthetic_tokenizer_covers_every_word():
    data = synthetic_dataset()
    tokenizer = CaptionTokenizer.from_file(data.tokenizer_model)
    captions = [caption_of(*draw_scene(np.random.default_rng([7, 0, i]))) for i in range(200)]
    rows = tokenizer.encode_batch(captions, 128)
    assert not (rows == 1).any()  # no UNK
    lengths = (rows != 0).sum(1)
    assert lengths.max() < 64  # one piece per word: short sequences
    assert [tokenizer.decode(r) for r in rows] == captions


def test_model_without_pad_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "nopad"),
                                   vocab_size=40, minloglevel=2)  # SentencePiece default: no PAD
    with pytest.raises(ValueError, match="no pad piece"):
        CaptionTokenizer.from_file(str(tmp_path / "nopad.model"))
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        CaptionTokenizer.from_file(str(tmp_path / "missing.model"))


def test_train_tokenizer_rejects_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_tokenizer(["", "   "], str(tmp_path / "t"), 100)
    assert not (tmp_path / "t.model").exists()
