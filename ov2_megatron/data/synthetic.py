"""A procedurally drawn image-caption dataset whose captions are fully determined by pixels.

Each image is a neutral background with 1-4 flat shapes on a 3x3 grid (at most one per cell),
each with a shape (3), a colour (5) and a size (2). The caption names every attribute, objects
in reading order (top-to-bottom, left-to-right), e.g.
    "three shapes on a gray background: a large red circle at the top left, a small blue
     square in the center and a small yellow triangle at the bottom right."
Nothing in a caption is random given the image, so a captioner that sees the image can drive
its loss towards zero, while a caption-only model must pay the entropy of the scene
(~2 bits for the count, ~1.6 for the background and ~8 per object for cell, shape, colour and
size). Words were picked to be unambiguous at 64 px and after upsampling or an 80%+ crop.
Flip stays off: captions say left and right.

Sample i of a split is drawn from `default_rng([seed, split, i])`, so any sample can be made
alone, in any order, and the dataset has any size. The per-sample `.json` sidecar carries
the scene as structured attributes (count, background, dominant shape/colour) for probes.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ov2_megatron.data.prepare import RawSample, write_report, write_samples
from ov2_megatron.data.tokenizer import train_tokenizer

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 225),
          "yellow": (240, 215, 30), "purple": (150, 50, 190)}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}
SIZES = {"small": 0.5, "large": 0.75}  # object side as a fraction of a grid cell
CELL_PHRASES = ("at the top left", "at the top", "at the top right",
                "on the left", "in the center", "on the right",
                "at the bottom left", "at the bottom", "at the bottom right")
COUNT_WORDS = ("one", "two", "three", "four")
MAX_OBJECTS = 4
_SUPERSAMPLE = 4  # draw 4x larger, then downsample: anti-aliased edges without a fancy renderer
_VERSION = 2      # bump when drawing or captions change: it is part of the cache directory name


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major on the 3x3 grid


def draw_scene(rng: np.random.Generator) -> tuple[str, list[SceneObject]]:
    """Random background and 1-4 objects in distinct cells, sorted in reading order."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(9, size=count, replace=False).tolist())
    objects = [SceneObject(shape=SHAPES[rng.integers(len(SHAPES))],
                           color=list(COLORS)[rng.integers(len(COLORS))],
                           size=list(SIZES)[rng.integers(len(SIZES))], cell=cell)
               for cell in cells]
    return background, objects


def caption_of(background: str, objects: list[SceneObject]) -> str:
    phrases = [f"a {o.size} {o.color} {o.shape} {CELL_PHRASES[o.cell]}" for o in objects]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    noun = "shape" if len(objects) == 1 else "shapes"
    return f"{COUNT_WORDS[len(objects) - 1]} {noun} on a {background} background: {listed}."


def attributes_of(background: str, objects: list[SceneObject]) -> dict:
    """Structured labels; the dominant object is the first large one in reading order (else
    the first), so the label is a function of the pixels like the caption."""
    dominant = next((o for o in objects if o.size == "large"), objects[0])
    return {
        "count": len(objects), "background": background,
        "dominant_shape": dominant.shape, "dominant_color": dominant.color,
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size,
                     "row": o.cell // 3, "col": o.cell % 3} for o in objects],
        "labels": {"count": len(objects) - 1,
                   "background": list(BACKGROUNDS).index(background),
                   "dominant_shape": SHAPES.index(dominant.shape),
                   "dominant_color": list(COLORS).index(dominant.color)},
    }


def render(rng: np.random.Generator, background: str, objects: list[SceneObject],
           image_size: int) -> Image.Image:
    """Draw the scene; colours and positions get small jitter so images are not templates."""
    big = image_size * _SUPERSAMPLE
    cell = big / 3
    bg = _jitter(rng, BACKGROUNDS[background], 8)
    image = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        side = SIZES[obj.size] * cell * rng.uniform(0.9, 1.0)
        slack = cell - side
        # Keep a margin to the cell border so JPEG/chroma bleed never reaches the next cell:
        # "at the top left" must never be ambiguous.
        x0 = (obj.cell % 3) * cell + rng.uniform(0.15, 0.85) * slack
        y0 = (obj.cell // 3) * cell + rng.uniform(0.15, 0.85) * slack
        box = (x0, y0, x0 + side, y0 + side)
        fill = _jitter(rng, COLORS[obj.color], 15)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image.resize((image_size, image_size), Image.BOX)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def synthetic_sample(index: int, split: int, seed: int, image_size: int,
                     quality: int = 92) -> tuple[bytes, str, dict]:
    """(jpeg, caption, attributes) of sample `index` of `split` (0 train, 1 val)."""
    rng = np.random.default_rng([seed, split, index])
    background, objects = draw_scene(rng)
    buf = io.BytesIO()
    render(rng, background, objects, image_size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), caption_of(background, objects), attributes_of(background, objects)


def iter_synthetic(count: int, split: int, seed: int, image_size: int) -> Iterator[RawSample]:
    for i in range(count):
        jpeg, caption, attrs = synthetic_sample(i, split, seed, image_size)
        yield RawSample(source=f"synthetic/{split}/{i}", image=jpeg, caption=caption, meta=attrs)


@dataclass(frozen=True)
class SyntheticDataset:
    root: str
    train_dir: str
    val_dir: str
    tokenizer_model: str
    num_train: int
    num_val: int
    image_size: int


def ensure_synthetic_dataset(cache_dir: str, num_train: int, num_val: int, image_size: int = 64,
                             seed: int = 0, vocab_size: int = 128,
                             samples_per_shard: int = 1000) -> SyntheticDataset:
    """Build train/val shards and a tokenizer under `cache_dir` once; later calls are no-ops.

    Built in a temporary sibling directory and renamed into place in one step, so a crash
    mid-build leaves no directory with the final name, and two concurrent builders (e.g. two
    ranks) both end with the same complete dataset.
    """
    if num_train < 1 or num_val < 0 or image_size < 16:
        raise ValueError(f"synthetic dataset needs num_train >= 1, num_val >= 0, image_size >= "
                         f"16; got {num_train}, {num_val}, {image_size}")
    name = (f"synthetic-v{_VERSION}-train{num_train}-val{num_val}-px{image_size}-seed{seed}"
            f"-vocab{vocab_size}-per{samples_per_shard}")
    root = os.path.join(cache_dir, name)
    dataset = SyntheticDataset(root=root, train_dir=os.path.join(root, "train"),
                               val_dir=os.path.join(root, "val"),
                               tokenizer_model=os.path.join(root, "tokenizer.model"),
                               num_train=num_train, num_val=num_val, image_size=image_size)
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return dataset
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is shared by every rank/user
    try:
        for split, split_dir, count in ((0, "train", num_train), (1, "val", num_val)):
            out = os.path.join(tmp, split_dir)
            report = write_samples(iter_synthetic(count, split, seed, image_size), out,
                                   samples_per_shard)
            write_report(out, report, fingerprint=name)
        captions = (caption_of(*draw_scene(np.random.default_rng([seed, 0, i])))
                    for i in range(num_train))
        train_tokenizer(captions, os.path.join(tmp, "tokenizer"), vocab_size)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(name + "\n")
        try:
            os.rename(tmp, root)
        except OSError:  # another builder won the race; its result is identical
            if not os.path.isfile(os.path.join(root, "COMPLETE")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset


__all__ = ["SHAPES", "COLORS", "BACKGROUNDS", "SIZES", "CELL_PHRASES", "SceneObject",
           "draw_scene", "caption_of", "attributes_of", "render", "synthetic_sample",
           "iter_synthetic", "SyntheticDataset", "ensure_synthetic_dataset"]
