"""Shards as img2dataset and re-captioning tools write them: JPEG, PNG and WebP images (real
PIL-encoded bytes), captions in `.txt` or only in a `.json` field, no DALI index beside them."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (absent on the GPU box)")

from ov2_megatron.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig  # noqa: E402
from ov2_megatron.data.dali_pipeline import ImageCaptionLoader  # noqa: E402
from ov2_megatron.data.shard_index import build_index, cached_index_path, ensure_index  # noqa: E402
from ov2_megatron.data.shards import read_index  # noqa: E402
from ov2_megatron.data.tokenizer import train_tokenizer  # noqa: E402
from tests.data.shard_factory import image_bytes, write_img2dataset_shard  # noqa: E402

FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG"))
SQUARE = (40, 40)  # eval resizes and centre-crops: a square keeps the whole image, so its mean


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    captions = [f"sample {i} {w}" for i in range(100) for w in ("good", "alt", "other")]
    return train_tokenizer(captions, str(tmp_path_factory.mktemp("tok") / "tok"), 64)


def _json(i: int, layout: str) -> bytes:
    caption = f"sample {i} good"
    meta = {"url": f"http://x/{i}.jpg", "caption": "the alt text, not this"}
    if layout == "re_caption":
        meta["re_caption"] = caption
    elif layout == "dotted":
        meta["meta"] = {"caption": caption}
    elif layout == "list":
        meta["re_caption"] = [caption, f"sample {i} alt"]
    return json.dumps(meta).encode()


def write_set(root, layout: str, shards: int = 4, per_shard: int = 6) -> str:
    """`shards` shards, one image format each, captions by `layout` ("txt", "re_caption",
    "dotted" or "list"); sample i has caption "sample i good" (its first candidate)."""
    os.makedirs(root, exist_ok=True)
    for s in range(shards):
        ext, fmt = FORMATS[s % len(FORMATS)]
        samples = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            parts = {ext: image_bytes(i, fmt, SQUARE), "json": _json(i, layout)}
            if layout == "txt":
                parts["txt"] = f"sample {i} good".encode()
            samples.append((f"{i:09d}", parts))
        write_img2dataset_shard(os.path.join(root, f"{s:05d}.tar"), samples)
    return str(root)


def config(shards, tokenizer_model, **overrides) -> DataConfig:
    values = dict(train_shards=shards, val_shards=shards, tokenizer_model=tokenizer_model,
                  resolution=16, caption_length=12, num_threads=1, shuffle_buffer=8, seed=3,
                  color_jitter=0.0, grayscale_probability=0.0)
    return DataConfig(**{**values, **overrides})


@pytest.mark.parametrize("layout,key", [("txt", ""), ("re_caption", "re_caption"),
                                        ("dotted", "meta.caption"), ("list", "re_caption")])
def test_eval_reads_every_format_and_caption_layout(tmp_path, tokenizer_model, layout, key):
    root = write_set(tmp_path / layout, layout)
    assert not any(name.endswith(".idx") for name in os.listdir(root))
    loader = ImageCaptionLoader(config(root, tokenizer_model, caption_key=key), dp_rank=0,
                                dp_size=1, batch_size=6, training=False, device="cpu")
    batches = list(loader)
    captions = [c for b in batches for c in b["captions"]]
    assert captions == [f"sample {i} good" for i in range(24)]  # list: always the first
    assert loader.stats() == {}
    assert sorted(n for n in os.listdir(root) if n.endswith(".idx")) == \
        [f"{s:05d}.idx" for s in range(4)]  # made on first use, beside the shards
    # The pixels are the encoded image's: compare each row's mean colour with PIL's decode.
    for b, batch in enumerate(batches):
        for row in range(len(batch["captions"])):
            i = b * 6 + row
            ext, fmt = FORMATS[(i // 6) % len(FORMATS)]
            pil = np.asarray(Image.open(io.BytesIO(image_bytes(i, fmt, SQUARE))).convert("RGB"))
            expected = (pil.reshape(-1, 3).mean(0) / 255 - IMAGENET_MEAN) / IMAGENET_STD
            got = batch["images"][row].reshape(3, -1).mean(1).numpy()
            assert np.abs(got - expected).max() < 0.15, (i, fmt, got, expected)


def test_candidates_drawn_per_epoch_from_the_seed_and_resume_exactly(tmp_path, tokenizer_model):
    root = write_set(tmp_path / "list", "list", shards=2, per_shard=6)
    cfg = config(root, tokenizer_model, caption_key="re_caption")

    def open_loader(state=None):
        return ImageCaptionLoader(cfg, dp_rank=0, dp_size=1, batch_size=4, device="cpu",
                                  resume_state=state)

    loader = open_loader()
    texts, state, tokens = [], None, []
    for step in range(12):  # 48 samples: 4 epochs of 12
        batch = next(loader)
        tokens.append(batch["tokens"])
        texts += [loader.tokenizer.decode(row) for row in batch["tokens"]]
        if step == 4:
            state = loader.state()
    words = [t.split()[2] for t in texts]
    assert set(words) == {"good", "alt"}  # both candidates are used...
    per_sample = {}
    for text in texts:
        per_sample.setdefault(int(text.split()[1]), set()).add(text.split()[2])
    assert sum(len(v) == 2 for v in per_sample.values()) >= 3  # ...and change across epochs
    again = open_loader()
    assert all(np.array_equal(next(again)["tokens"], t) for t in tokens[:3])  # same seed
    resumed = open_loader(state)
    for step in range(5, 12):
        assert np.array_equal(next(resumed)["tokens"], tokens[step]), step


def test_index_goes_to_cache_dir_when_shard_dir_is_read_only(tmp_path, monkeypatch):
    root = write_set(tmp_path / "ro", "txt", shards=1)
    shard = os.path.join(root, "00000.tar")
    real_open = open

    def read_only_open(path, mode="r", *args, **kwargs):  # root ignores chmod: simulate it
        if "w" in mode and str(path).startswith(root):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    cache = str(tmp_path / "cache")
    index = ensure_index(shard, cache)
    assert index == cached_index_path(shard, cache) and index.startswith(cache)
    assert ensure_index(shard, cache) == index  # found again, not rebuilt
    monkeypatch.undo()
    samples = read_index(index)
    assert len(samples) == 6 and samples[0][0][0] == "jpg"
    with real_open(shard, "rb") as f:  # offsets point at the payloads
        ext, offset, size, name = samples[2][0]
        f.seek(offset)
        assert f.read(size) == image_bytes(2, "JPEG", SQUARE)
    assert len(build_index(shard)) == 6
