"""Images whose PIL reading differs from what training decodes (issue #23): 16-bit PNGs
(PIL's convert("RGB") clips them to white), palette transparency and alpha (DALI drops alpha
and keeps the stored colours). The reference is the written pixel values and DALI's own CPU
decoder."""

import io

import numpy as np
from PIL import Image

from ov2_megatron.data.image_decode import to_rgb
from tests.data.test_shard_inputs import tool


def grey16_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale gradient 0..65535 over 64 columns; returns (PNG, expected 8-bit)."""
    values = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))  # [h, w]
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")  # uint16 -> mode I;16
    return buf.getvalue(), np.rint(values / 257.0).astype(np.uint8)


def test_a_16_bit_png_keeps_its_content_through_prepare_shards(tmp_path):
    from ov2_megatron.data.resize_shards import ResizeSettings, resize_image
    from ov2_megatron.data.shards import iter_shard

    png, want = grey16_png()
    assert Image.open(io.BytesIO(png)).mode.startswith("I")  # PIL reads it as 16-bit grey
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "grey.png").write_bytes(png)
    (inputs / "grey.txt").write_text("a grey gradient")
    assert tool("prepare_shards")(["--input", str(inputs), "--output",
                                   str(tmp_path / "out")]) == 0  # the command line
    sample = next(iter_shard(str(tmp_path / "out" / "shard-000000.tar")))
    got = np.asarray(Image.open(io.BytesIO(sample.jpeg)).convert("L"), dtype=np.int16)
    assert np.abs(got - want).max() <= 4  # JPEG error; before: 255 everywhere
    resized, _, _ = resize_image(png, ResizeSettings(short_side=16))  # --resize: halves it
    small = np.asarray(Image.open(io.BytesIO(resized)).convert("L"), dtype=np.int16)
    expected = np.asarray(Image.fromarray(want).resize(small.shape[::-1], Image.LANCZOS),
                          dtype=np.int16)
    assert np.abs(small - expected).max() <= 6


def dali_cpu_decode(data: bytes) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)],
                                     batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    return np.array(pipe.run()[0].at(0))


def test_palette_transparency_and_alpha_decode_as_dali_does():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (24, 32, 4), dtype=np.uint8))  # RGBA
    palette = rgba.convert("RGB").quantize(16)
    palette.info["transparency"] = 3  # one palette entry transparent
    grey16, _ = grey16_png()
    for image in (rgba, palette):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        ours = np.asarray(to_rgb(Image.open(io.BytesIO(data))), dtype=np.int16)
        assert np.abs(ours - dali_cpu_decode(data)).max() <= 1, image.mode
    ours = np.asarray(to_rgb(Image.open(io.BytesIO(grey16))), dtype=np.int16)
    assert np.abs(ours - dali_cpu_decode(grey16)).max() <= 1
