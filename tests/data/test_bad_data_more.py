"""Bad data that decoders accept: a JPEG whose scan data is corrupt (libjpeg-turbo and PIL
only warn and decode grey blocks) is counted `corrupt_scan`, and a caption longer than
data.max_caption_bytes is counted `caption_too_long` before it is tokenized, without
stalling the batch that holds it. Real bytes throughout."""

from __future__ import annotations

import importlib.util
import io
import time
import timeit

import numpy as np
import pytest
from PIL import Image

from ov2_megatron.data.config import DataConfig
from ov2_megatron.data.sample_checks import (Issue, check_encoded_jpeg, check_jpeg_scans,
                                             inspect_image)
from tests.data.shard_factory import decoder_breaking_jpeg, jpeg_bytes, write_img2dataset_shard


def _encode(pixels: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **options)
    return buf.getvalue()


def _noise(side: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)


def _scan_start(data: bytes) -> int:
    """First byte of entropy-coded data: after the SOS segment (JFIF files from PIL carry no
    thumbnail, so the first FF DA is the frame's)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def corrupt_scan_jpeg(seed: int = 0) -> bytes:
    """Headers intact; a restart marker written into the middle of the scan data, where the
    file defines no restart interval: libjpeg-turbo (PIL, DALI's CPU decoder) warns "Corrupt
    JPEG data" and decodes the rest of the scan as flat grey."""
    data = bytearray(_encode(_noise(64, seed), quality=90))
    start = _scan_start(bytes(data))
    middle = (start + len(data)) // 2
    data[middle:middle + 6] = b"\x11\xff\xd3\x42\x99\x17"
    return bytes(data)


def test_pil_decodes_the_corrupt_scan_but_the_check_counts_it():
    data = corrupt_scan_jpeg()
    image = Image.open(io.BytesIO(data))
    image.load()  # PIL accepts it: libjpeg only warned
    assert image.size == (64, 64)
    assert check_encoded_jpeg(data, 10**8) == Issue.CORRUPT_SCAN
    assert inspect_image(data, 10**8) == (None, "corrupt: broken JPEG scan data")


@pytest.mark.parametrize("options", [
    dict(quality=90), dict(quality=95, subsampling=0), dict(quality=75, optimize=True),
    dict(quality=85, progressive=True), dict(quality=90, restart_marker_blocks=1),
    dict(quality=90, progressive=True, restart_marker_rows=1)], ids=str)
def test_valid_jpegs_pass_the_scan_check(options):
    for seed in range(4):
        for pixels in (_noise(64, seed), _noise(48, seed)[:, :, :1].repeat(3, axis=2)):
            data = _encode(pixels, **options)
            assert check_encoded_jpeg(data, 10**8) == Issue.OK, (options, seed)
    gray = _encode(_noise(40)[:, :, 0])
    assert check_encoded_jpeg(gray, 10**8) == Issue.OK
    assert check_encoded_jpeg(jpeg_bytes(3), 10**8) == Issue.OK


def test_other_scan_corruptions():
    good = _encode(_noise(64), quality=90, restart_marker_blocks=4)
    start = _scan_start(good)
    rst = [i for i in range(start, len(good) - 1)
           if good[i] == 0xFF and 0xD0 <= good[i + 1] <= 0xD7]
    assert len(rst) > 2
    swapped = bytearray(good)
    swapped[rst[1] + 1] = 0xD5  # restarts out of order
    assert check_jpeg_scans(bytes(swapped)) == Issue.CORRUPT_SCAN
    frame_inside = bytearray(good)
    frame_inside[rst[1] + 1] = 0xC0  # a frame header inside the scan
    assert check_jpeg_scans(bytes(frame_inside)) == Issue.CORRUPT_SCAN
    # The recovery tests' decoder-breaking JPEG stays for the decoder to judge (it overwrites
    # tables, not the scan's byte stuffing).
    assert check_encoded_jpeg(decoder_breaking_jpeg(), 10**8) == Issue.OK


def test_the_scan_check_is_cheap():
    data = _encode(_noise(512), quality=90)  # ~200 KB, larger than a typical web image
    seconds = min(timeit.repeat(lambda: check_encoded_jpeg(data, 10**8), number=20,
                                repeat=3)) / 20
    assert seconds < 2e-3, f"{seconds * 1e6:.0f} us for {len(data) // 1024} KiB"


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


needs_dali = pytest.mark.skipif(not _has_dali(), reason="needs NVIDIA DALI")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    from ov2_megatron.data.tokenizer import train_tokenizer

    return train_tokenizer([f"sample {i} good" for i in range(100)],
                           str(tmp_path_factory.mktemp("tok") / "tok"), 64)


def _loader(config, batch_size: int):
    from ov2_megatron.data.dali_pipeline import ImageCaptionLoader

    return ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=batch_size,
                              training=False, device="cpu")


def _config(shard, tokenizer_model, **overrides) -> DataConfig:
    values = dict(train_shards=shard, val_shards=shard, tokenizer_model=tokenizer_model,
                  resolution=16, caption_length=12, num_threads=1, shuffle_buffer=8, seed=0,
                  color_jitter=0.0, grayscale_probability=0.0)
    return DataConfig(**{**values, **overrides})


@needs_dali
def test_loader_counts_corrupt_scans_and_long_captions(tmp_path, tokenizer_model):
    long_caption = ("word " * 200_000).encode()  # 1 MB
    samples = [(f"{i:05d}", {"jpg": jpeg_bytes(i), "txt": f"sample {i} good".encode()})
               for i in range(6)]
    samples.insert(2, ("bad_scan", {"jpg": corrupt_scan_jpeg(), "txt": b"sample 90 bad"}))
    samples.insert(5, ("long", {"jpg": jpeg_bytes(91), "txt": long_caption}))
    shard = write_img2dataset_shard(str(tmp_path / "mixed.tar"), samples)
    loader = _loader(_config(shard, tokenizer_model), batch_size=4)
    started = time.monotonic()
    captions = [c for batch in loader for c in batch["captions"]]
    assert time.monotonic() - started < 5  # tokenizing 1 MB each pass would take seconds
    assert captions == [f"sample {i} good" for i in range(6)]
    assert loader.stats() == {"caption_too_long": 1, "corrupt_scan": 1}


@needs_dali
def test_max_caption_bytes_is_the_bound(tmp_path, tokenizer_model):
    samples = [("a", {"jpg": jpeg_bytes(0), "txt": b"sample 1 good"}),
               ("b", {"jpg": jpeg_bytes(1), "txt": b"sample 2 good and longer"})]
    shard = write_img2dataset_shard(str(tmp_path / "two.tar"), samples)
    loader = _loader(_config(shard, tokenizer_model, max_caption_bytes=20), batch_size=2)
    assert [c for batch in loader for c in batch["captions"]] == ["sample 1 good"]
    assert loader.stats() == {"caption_too_long": 1}
    with pytest.raises(ValueError, match="DataConfig.max_caption_bytes 0 must be >= 1"):
        _config(shard, tokenizer_model, max_caption_bytes=0).validate()
