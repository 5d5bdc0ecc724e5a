"""Images, webdataset shards or ready pixel arrays -> encode() features, batched.

    --pixels FILE.npy   [N, C, H, W] float32, already normalised: used as they are (the exact
                        input for comparing exported models with this framework)
    --images DIR        every .jpg/.jpeg/.png/.webp/.bmp below DIR, sorted by path
    --shards GLOB       webdataset shards (data/shards.py): each sample's image

Images go through the one evaluation transform (data/preprocess.py: bilinear squash to the
model resolution by default, as the released checkpoints declare, or shorter side + centre
crop with --resize shortest), the transform the exports' image-processor configs declare.
Features are encode()'s, as the official ViT returns them: patch tokens [N, patches, w], the
raw output of the last block with CLS and registers dropped (no LayerNorm: what the caption
decoder was trained on), and pooled [N, w] = LN(mean of the patch tokens).
Outputs: `.npy` holds one of them and is filled batch by batch in a memory-mapped file;
`.safetensors` holds both (`patch_tokens`, `pooled`), gathered in memory. Images and shards
also get OUTPUT.keys.txt, one sample key per row. Every file is written under a temporary
name and renamed at the end.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.atomic_output import staged_file
from ov2_megatron.data.preprocess import EvalTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class Progress:
    """One self-overwriting line on stderr: done/total, a bar, images per second."""

    def __init__(self, total: int, label: str = "features", stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.done, self.started = 0, time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        filled = int(30 * self.done / max(self.total, 1))
        self.stream.write(f"\r{self.label} {self.done}/{self.total} "
                          f"[{'#' * filled}{'.' * (30 - filled)}] {rate:.1f} img/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class Source:
    """A sized stream of (key, [C, H, W] float32) samples."""

    def __init__(self, count: int, items: Iterator[tuple[str | None, np.ndarray]],
                 has_keys: bool):
        self.count, self.items, self.has_keys = count, items, has_keys


def pixel_source(path: str, in_channels: int) -> Source:
    try:
        pixels = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ConversionError(f"--pixels {path}: not a readable .npy array ({error})") from None
    if pixels.ndim != 4 or pixels.shape[1] != in_channels or pixels.dtype != np.float32:
        raise ConversionError(f"--pixels {path}: {pixels.dtype} array of shape {pixels.shape}; "
                              f"expected float32 [N, {in_channels}, H, W], already normalised")
    return Source(len(pixels), ((None, np.asarray(p)) for p in pixels), has_keys=False)


def image_source(directory: str, transform: EvalTransform) -> Source:
    from PIL import Image

    if not os.path.isdir(directory):
        raise ConversionError(f"--images {directory}: not a directory")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ConversionError(f"--images {directory}: no {'/'.join(IMAGE_EXTENSIONS)} files")

    def items():
        for path in paths:
            try:
                with Image.open(path) as image:
                    pixels = transform(image)
            except OSError as error:
                raise ConversionError(f"{path}: cannot decode the image ({error})") from None
            yield os.path.relpath(path, directory), pixels

    return Source(len(paths), items(), has_keys=True)


def shard_source(spec: str, transform: EvalTransform) -> Source:
    from PIL import Image

    from ov2_megatron.data.config import resolve_shard_spec
    from ov2_megatron.data.shards import iter_shards_checked

    try:
        shards = resolve_shard_spec(spec)
    except (OSError, ValueError) as error:
        raise ConversionError(f"--shards {spec}: {error}") from None
    # A cut shard's complete samples are read (and it is named, once: by the second pass).
    count = sum(1 for _ in iter_shards_checked(shards, None, False, on_cut=lambda cut: None))

    def items():
        for shard, sample in iter_shards_checked(shards, None):
            try:
                with Image.open(io.BytesIO(sample.jpeg)) as image:
                    pixels = transform(image)
            except OSError as error:
                raise ConversionError(f"{shard}: sample {sample.key}: cannot decode the "
                                      f"image ({error})") from None
            yield sample.key, pixels

    return Source(count, items(), has_keys=True)


def batches(source: Source, batch_size: int) -> Iterator[tuple[list, np.ndarray]]:
    keys, arrays = [], []
    for key, pixels in source.items:
        keys.append(key)
        arrays.append(pixels)
        if len(arrays) == batch_size:
            yield keys, np.stack(arrays)
            keys, arrays = [], []
    if arrays:
        yield keys, np.stack(arrays)


def extract(chunk, source: Source, output: str, features: str, batch_size: int,
            device: str, progress: bool = True) -> dict[str, tuple[int, ...]]:
    """Run encode() over `source` and write `output`; returns the written shapes."""
    if source.count == 0:
        raise ConversionError("no input samples")
    if not output.endswith((".npy", ".safetensors")):
        raise ConversionError(f"--output {output}: use a .npy or .safetensors file name")
    npy = output.endswith(".npy")
    bar = Progress(source.count) if progress else None
    keys, gathered, written = [], {"patch_tokens": [], "pooled": []}, 0
    with staged_file(output) as staging:
        array = None
        for batch_keys, pixels in batches(source, batch_size):
            with torch.no_grad():
                encoded = chunk.encode(torch.from_numpy(pixels).to(device))
            result = {name: value.float().cpu().contiguous().numpy()
                      for name, value in zip(("patch_tokens", "pooled"), encoded)}
            if npy:
                value = result["patch_tokens" if features == "patch" else "pooled"]
                if array is None:
                    array = np.lib.format.open_memmap(
                        staging, mode="w+", dtype=np.float32,
                        shape=(source.count, *value.shape[1:]))
                array[written:written + len(value)] = value
            else:
                for name, value in result.items():
                    gathered[name].append(value)
            written += len(pixels)
            keys.extend(batch_keys)
            if bar:
                bar.update(len(pixels))
        if bar:
            bar.close()
        if npy:
            shapes = {features: tuple(array.shape)}
            array.flush()
            del array
        else:
            from safetensors.numpy import save_file

            # contiguous: safetensors.numpy writes a strided array's buffer as it lies
            tensors = {name: np.ascontiguousarray(np.concatenate(parts))
                       for name, parts in gathered.items()}
            save_file(tensors, staging)
            shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        if source.has_keys:
            with staged_file(output + ".keys.txt") as key_file:
                with open(key_file, "w") as f:
                    f.write("".join(f"{key}\n" for key in keys))
    return shapes
