"""Synthetic dataset: determinism, atomic caching, and captions recoverable from pixels."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ov2_megatron.data.shards import iter_shard
from ov2_megatron.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    ensure_synthetic_dataset,
    synthetic_sample,
)
from tests.data.shard_factory import synthetic_dataset


def read_scene(jpeg: bytes) -> dict:
    """Recover the scene from pixels alone, knowing only the palette and the 3x3 grid:
    background from a corner; per cell, the blob that differs from it gives the colour
    (nearest palette entry), a soft coverage map (anti-aliased edges count partially) gives
    the size, and its silhouette the shape (a triangle is narrow at the top, a square fills
    its bounding-box corners, a circle does not)."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(float)
    size = pixels.shape[0]
    corner = np.median(pixels[:2, :2].reshape(-1, 3), axis=0)
    background = min(BACKGROUNDS, key=lambda n: np.linalg.norm(corner - BACKGROUNDS[n]))
    objects = []
    edges = np.linspace(0, size, 4).round().astype(int)
    for cell in range(9):
        r, c = divmod(cell, 3)
        block = pixels[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] - corner  # [h, w, 3]
        strong = np.linalg.norm(block, axis=2) > 60
        if strong.mean() < 0.05:
            continue
        colour = np.median(block[strong], axis=0)
        coverage = np.clip(block @ colour / (colour @ colour), 0, 1)  # [h, w] in [0, 1]
        ys, xs = np.nonzero(coverage > 0.5)
        blob = coverage[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        quarter = max(1, blob.shape[0] // 4)
        corners = np.mean([blob[0, 0], blob[0, -1], blob[-1, 0], blob[-1, -1]])
        if blob[:quarter].sum() < 0.6 * blob[-quarter:].sum():
            shape = "triangle"
        else:
            shape = "square" if corners > 0.3 else "circle"
        fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
        side = np.sqrt(coverage.sum() / fill) / (size / 3)
        objects.append({"shape": shape,
                        "color": min(COLORS, key=lambda n: np.linalg.norm(colour + corner
                                                                        - COLORS[n])),
                        "size": "large" if side > 0.6 else "small", "row": r, "col": c})
    return {"background": background, "count": len(objects), "objects": objects}


def test_captions_are_recoverable_from_pixels():
    """At 64 px a hand-written pixel reader recovers background, count, positions and colours
    of every object exactly, and shape and size for >= 95% of objects (the misses are the
    reader's crude silhouette rules on ~10 px shapes, not ambiguity a network would face)."""
    objects = agree = 0
    for index in range(300):
        jpeg, caption, attrs = synthetic_sample(index, split=0, seed=3, image_size=64)
        seen = read_scene(jpeg)
        assert seen["background"] == attrs["background"], caption
        assert f"on a {attrs['background']} background" in caption
        assert [(o["row"], o["col"], o["color"]) for o in seen["objects"]] == [
            (o["row"], o["col"], o["color"]) for o in attrs["objects"]], caption
        for truth, read in zip(attrs["objects"], seen["objects"], strict=True):
            objects += 1
            agree += (truth["shape"], truth["size"]) == (read["shape"], read["size"])
    assert agree / objects >= 0.95, agree / objects


def test_same_seed_same_bytes_other_seed_or_split_differs():
    a = [synthetic_sample(i, 0, 5, 32) for i in range(20)]
    assert a == [synthetic_sample(i, 0, 5, 32) for i in range(20)]
    assert [s[0] for s in a] != [synthetic_sample(i, 0, 6, 32)[0] for i in range(20)]
    assert [s[1] for s in a] != [synthetic_sample(i, 1, 5, 32)[1] for i in range(20)]


def test_attributes_are_varied_and_consistent():
    samples = [synthetic_sample(i, 0, 0, 32) for i in range(400)]
    counts = {s[2]["count"] for s in samples}
    assert counts == {1, 2, 3, 4}
    assert {s[2]["background"] for s in samples} == set(BACKGROUNDS)
    assert {s[2]["dominant_color"] for s in samples} == set(COLORS)
    for _, caption, attrs in samples:
        dominant = attrs["objects"][[o["size"] for o in attrs["objects"]].index("large")] if any(
            o["size"] == "large" for o in attrs["objects"]) else attrs["objects"][0]
        assert (attrs["dominant_shape"], attrs["dominant_color"]) == (dominant["shape"],
                                                                      dominant["color"])
        assert f"{dominant['color']} {dominant['shape']}" in caption
    # caption-only baseline needs real entropy: many distinct captions, little repetition
    assert len({s[1] for s in samples}) > 390


def test_ensure_builds_once_atomically(tmp_path):
    data = ensure_synthetic_dataset(str(tmp_path), 30, 10, 32, seed=1, vocab_size=128,
                                    samples_per_shard=8)
    train = [s for p in sorted(os.listdir(data.train_dir)) if p.endswith(".tar")
             for s in iter_shard(os.path.join(data.train_dir, p))]
    val = [s for p in sorted(os.listdir(data.val_dir)) if p.endswith(".tar")
           for s in iter_shard(os.path.join(data.val_dir, p))]
    assert len(train) == 30 and len(val) == 10
    assert [s.caption for s in train] == [synthetic_sample(i, 0, 1, 32)[1] for i in range(30)]
    assert train[4].meta["labels"]["count"] == train[4].meta["count"] - 1
    assert os.path.isfile(data.tokenizer_model)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dir left
    stamp = os.stat(os.path.join(data.root, "COMPLETE")).st_mtime_ns
    again = ensure_synthetic_dataset(str(tmp_path), 30, 10, 32, seed=1, vocab_size=128,
                                     samples_per_shard=8)
    assert again == data and os.stat(os.path.join(data.root, "COMPLETE")).st_mtime_ns == stamp


def test_a_crash_mid_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import ov2_megatron.data.synthetic as synthetic

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while training the tokenizer")

    monkeypatch.setattr(synthetic, "train_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(str(tmp_path), 12, 4, 32, samples_per_shard=8)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    data = ensure_synthetic_dataset(str(tmp_path), 12, 4, 32, samples_per_shard=8)
    assert os.path.isfile(os.path.join(data.root, "COMPLETE"))


def test_session_dataset_captions_match_generator():
    data = synthetic_dataset()
    first = next(iter_shard(os.path.join(data.val_dir, "shard-000000.tar")))
    jpeg, caption, attrs = synthetic_sample(0, 1, 0, data.image_size)
    assert (first.jpeg, first.caption) == (jpeg, caption)
    assert {k: first.meta[k] for k in attrs} == attrs
