"""Images whose PIL reading differs from what training decodes (issue #23): 16-bit PNGs
(PIL's convert("RGB") clips them to white), EXIF orientation (DALI applies it), palette
transparency and alpha (DALI drops alpha and keeps the stored colours). The references are
the written pixel values and DALI's own CPU decoder."""

import io
import warnings

import numpy as np
from PIL import Image

from ov2_megatron.data.image_decode import to_rgb
from ov2_megatron.data.shards import iter_shard
from tests.data.shard_factory import write_img2dataset_shard
from tests.data.test_shard_inputs import tool


def grey16_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale gradient 0..65535 over 64 columns; returns (PNG, expected 8-bit)."""
    values = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))  # [h, w]
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")  # uint16 -> mode I;16
    return buf.getvalue(), np.rint(values / 257.0).astype(np.uint8)


def test_a_16_bit_png_keeps_its_content_through_prepare_shards(tmp_path, capsys):
    """Both modes of the CLI, from an img2dataset shard holding the PNG. Before: PIL clipped
    every value above 255, so both wrote a solid white JPEG."""
    png, want = grey16_png()
    assert Image.open(io.BytesIO(png)).mode.startswith("I")  # PIL reads it as 16-bit grey
    shard = write_img2dataset_shard(str(tmp_path / "00000.tar"),
                                    [("grey", {"png": png, "txt": b"a grey gradient"})])
    main = tool("prepare_shards")
    assert main(["--input", shard, "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert main(["--resize", "16", "--input", shard, "--output", str(tmp_path / "small"),
                 "--workers", "1"]) == 0
    assert "written: 1 skipped: 0" in capsys.readouterr().out
    sample = next(iter_shard(str(tmp_path / "out" / "shard-000000.tar")))
    got = np.asarray(Image.open(io.BytesIO(sample.jpeg)).convert("L"), dtype=np.int16)
    assert np.abs(got - want).max() <= 4  # JPEG error; before: 255 everywhere
    resized = next(iter_shard(str(tmp_path / "small" / "00000.tar"))).jpeg  # 32 x 16 now
    small = np.asarray(Image.open(io.BytesIO(resized)).convert("L"), dtype=np.int16)
    expected = np.asarray(Image.fromarray(want).resize(small.shape[::-1], Image.LANCZOS),
                          dtype=np.int16)
    assert small.shape == (16, 32) and np.abs(small - expected).max() <= 6


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


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_palette_transparency_and_alpha_decode_as_dali_does():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (24, 32, 4), dtype=np.uint8))  # RGBA
    grey_alpha = rgba.convert("LA")
    palette = rgba.convert("RGB").quantize(16)
    palette.info["transparency"] = 3  # one palette entry transparent
    per_entry = bytes(range(0, 256, 16))  # tRNS with an alpha for each entry
    grey16, _ = grey16_png()
    cases = {"RGBA": encoded(rgba), "LA": encoded(grey_alpha), "P": encoded(palette),
             "P, alpha per entry": encoded(palette, transparency=per_entry), "I;16": grey16}
    for name, data in cases.items():
        with warnings.catch_warnings():
            # Before: convert("RGB") warned "Palette images with Transparency expressed in
            # bytes should be converted to RGBA" on every such image.
            warnings.simplefilter("error")
            ours = np.asarray(to_rgb(Image.open(io.BytesIO(data))), dtype=np.int16)
        assert np.abs(ours - dali_cpu_decode(data)).max() <= 1, name


def test_exif_orientation_is_applied_as_dali_does():
    """A JPEG and a PNG stored sideways with EXIF orientation 6 and 8: DALI turns them
    upright; before, PIL returned the stored pixels. JPEG at quality 100 without chroma
    subsampling: PIL and DALI's CPU decoder are both libjpeg-turbo."""
    rng = np.random.default_rng(1)
    stored = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))  # w 48, h 32
    for orientation in (6, 8):
        tag = Image.Exif()
        tag[0x0112] = orientation
        for data in (encoded(stored, exif=tag.tobytes()),
                     encoded(stored, "JPEG", quality=100, subsampling=0, exif=tag.tobytes())):
            reference = dali_cpu_decode(data)
            assert reference.shape == (48, 32, 3)  # DALI: upright
            ours = np.asarray(to_rgb(Image.open(io.BytesIO(data))), dtype=np.int16)
            assert ours.shape == reference.shape, orientation
            assert np.abs(ours - reference).max() <= 1, orientation
