"""Header-level checks that run inside the DALI pipeline, on real encoded files."""

import io

import numpy as np
import pytest
from PIL import Image

from ov2_megatron.data.sample_checks import Issue, check_caption, check_encoded_jpeg, inspect_image
from tests.data.shard_factory import decoder_breaking_jpeg, jpeg_bytes, png_bytes


def _jpeg(**save_args) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(
        buf, format="JPEG", **save_args)
    return buf.getvalue()


@pytest.mark.parametrize("variant", ["baseline", "progressive", "grayscale", "exif",
                                     "trailing_bytes", "numpy"])
def test_valid_jpegs_pass(variant):
    data = {"baseline": lambda: _jpeg(quality=90),
            "progressive": lambda: _jpeg(progressive=True),
            "grayscale": lambda: _gray(),
            "exif": lambda: _jpeg(exif=_exif()),
            "trailing_bytes": lambda: _jpeg() + b"\x00" * 64,
            "numpy": lambda: np.frombuffer(_jpeg(), dtype=np.uint8)}[variant]()
    assert check_encoded_jpeg(data, 10**6) == Issue.OK


def _gray() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (30, 20), 77).save(buf, format="JPEG")
    return buf.getvalue()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a long ImageDescription: SOF sits behind a big APP1 segment
    return exif.tobytes()


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncation_anywhere_is_detected(cut):
    for data in (_jpeg(), _jpeg(progressive=True)):
        truncated = data[: int(len(data) * cut)]
        assert check_encoded_jpeg(truncated, 10**6) in (Issue.TRUNCATED_IMAGE, Issue.CORRUPT_IMAGE)


def test_other_bad_images():
    assert check_encoded_jpeg(b"", 10**6) == Issue.EMPTY_IMAGE
    assert check_encoded_jpeg(png_bytes(), 10**6) == Issue.UNSUPPORTED_IMAGE
    assert check_encoded_jpeg(b"GIF89a" + b"\0" * 50, 10**6) == Issue.UNSUPPORTED_IMAGE
    assert check_encoded_jpeg(_jpeg(), 40 * 56 - 1) == Issue.OVERSIZED_IMAGE
    assert check_encoded_jpeg(_jpeg(), 40 * 56) == Issue.OK
    # entropy-data corruption is invisible to header checks: the loader's recovery handles it
    assert check_encoded_jpeg(decoder_breaking_jpeg(), 10**6) == Issue.OK


def test_captions():
    assert check_caption(b"a cat  on\na mat\t") == (Issue.OK, "a cat on a mat")
    assert check_caption("東京".encode()) == (Issue.OK, "東京")
    assert check_caption(b"")[0] == Issue.NO_CAPTION
    assert check_caption(b" \n\t ")[0] == Issue.NO_CAPTION
    assert check_caption("café".encode("latin-1"))[0] == Issue.CAPTION_NOT_UTF8
    assert check_caption(np.frombuffer(b"ok", dtype=np.uint8)) == (Issue.OK, "ok")
    assert check_caption(b"\xef\xbb\xbfa cat") == (Issue.OK, "a cat")  # UTF-8 BOM dropped
    assert check_caption(b"\xef\xbb\xbf \n")[0] == Issue.NO_CAPTION


def test_inspect_image_keeps_good_jpegs_and_converts_the_rest():
    good = jpeg_bytes(3)
    assert inspect_image(good, 10**6) == (good, "")
    converted, reason = inspect_image(png_bytes(), 10**6)
    assert reason == "" and Image.open(io.BytesIO(converted)).format == "JPEG"
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 50, 50, 0)).save(cmyk, format="JPEG")
    converted, _ = inspect_image(cmyk.getvalue(), 10**6)
    assert Image.open(io.BytesIO(converted)).mode == "RGB"
    assert inspect_image(good[:200], 10**6)[1] == "truncated"
    assert inspect_image(b"", 10**6)[1] == "empty_file"
    assert inspect_image(b"plain text" * 20, 10**6)[1] == "not_an_image"
    assert inspect_image(good, 100)[1] == "oversized"
