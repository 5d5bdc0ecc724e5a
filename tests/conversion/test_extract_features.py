"""tools/extract_features.py on image folders and webdataset shards: the same JPEGs give the
same features either way and equal --pixels on the preprocessed arrays; keys files list the
samples in order; outputs are .npy (one feature) or .safetensors (both)."""

import io
import os

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from tests.conversion.conftest import run_tools


def _jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        size = (40 + 9 * i, 56 - 4 * i)  # not square, not the model size
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def test_images_shards_and_pixels_agree(tp2_run, tmp_path):
    from ov2_megatron.data.preprocess import from_run
    from ov2_megatron.data.shards import Sample, ShardWriter
    from tests.conversion.checkpoints import tiny_run

    jpegs = _jpegs(5)
    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(jpegs):
        (images / f"img{i}.jpg").write_bytes(data)
    with ShardWriter(str(tmp_path / "shards"), samples_per_shard=3) as writer:
        for i, data in enumerate(jpegs):
            writer.write(Sample(key=f"img{i}", jpeg=data, caption="a caption"))
    run = tiny_run("unused")
    size, transform = run.model.vision.image_size, from_run(run)
    pixels = np.stack([transform(Image.open(io.BytesIO(d))) for d in jpegs])
    np.save(tmp_path / "pixels.npy", pixels)
    out = {name: str(tmp_path / name) for name in
           ("images.safetensors", "shards.safetensors", "patches_out.npy", "pooled_out.npy")}
    results = run_tools(
        ("extract_features", ["--checkpoint", tp2_run, "--images", str(images), "--output",
                              out["images.safetensors"], "--batch-size", "2"]),
        ("extract_features", ["--checkpoint", tp2_run, "--shards",
                              str(tmp_path / "shards" / "*.tar"), "--output",
                              out["shards.safetensors"], "--batch-size", "4"]),
        ("extract_features", ["--checkpoint", tp2_run, "--pixels", str(tmp_path / "pixels.npy"),
                              "--output", out["patches_out.npy"], "--no-progress"]),
        ("extract_features", ["--checkpoint", tp2_run, "--pixels", str(tmp_path / "pixels.npy"),
                              "--output", out["pooled_out.npy"], "--features", "pooled"]))
    assert "5/5" in results[0][2] and "5/5" in results[1][2]
    from_images = load_file(out["images.safetensors"])
    from_shards = load_file(out["shards.safetensors"])
    patches, pooled = np.load(out["patches_out.npy"]), np.load(out["pooled_out.npy"])
    assert patches.shape == (5, (size // 8) ** 2, 128) and pooled.shape == (5, 128)
    for name, want in (("patch_tokens", patches), ("pooled", pooled)):
        assert np.abs(from_images[name] - want).max() <= 1e-5, name
        assert np.abs(from_shards[name] - want).max() <= 1e-5, name
    with open(out["images.safetensors"] + ".keys.txt") as f:
        assert f.read().split() == [f"img{i}.jpg" for i in range(5)]
    with open(out["shards.safetensors"] + ".keys.txt") as f:
        assert f.read().split() == [f"img{i}" for i in range(5)]
    assert not os.path.exists(out["patches_out.npy"] + ".keys.txt")


def test_an_exif_rotated_jpeg_gives_the_upright_images_features(tp2_run, tmp_path):
    """A phone photo: pixels stored sideways with EXIF orientation 6 ("rotate 90 clockwise to
    view"). Training (DALI) turns it upright; extract_features gave the sideways pixels'
    features. Reference: the same picture stored upright without a tag (JPEG quality 100,
    no chroma subsampling, sides multiples of 16, so the two encodings differ little)."""
    rng = np.random.default_rng(5)
    low = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8))
    upright = low.resize((64, 48), Image.BICUBIC)  # [w 64, h 48], smooth, not symmetric
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored as a camera would
    tag = Image.Exif()
    tag[0x0112] = 6  # Orientation: rotate 90 CW to view
    images = tmp_path / "images"
    images.mkdir()
    jpeg = dict(format="JPEG", quality=100, subsampling=0)
    upright.save(images / "a_upright.jpg", **jpeg)
    sideways.save(images / "b_tagged.jpg", exif=tag.tobytes(), **jpeg)
    sideways.save(images / "c_sideways.jpg", **jpeg)
    out = str(tmp_path / "features.safetensors")
    run_tools(("extract_features", ["--checkpoint", tp2_run, "--images", str(images),
                                    "--output", out, "--features", "pooled"]))
    pooled = load_file(out)["pooled"]
    to_upright = np.linalg.norm(pooled[1] - pooled[0])
    sideways_off = np.linalg.norm(pooled[2] - pooled[0])
    assert to_upright < 0.1 * sideways_off, (to_upright, sideways_off)
