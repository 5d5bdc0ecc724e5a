"""Test data for the data-path tests: real JPEGs, real broken files, raw tars.

Raw shards are written with tarfile and indexed with the `wds2idx` module that ships with the
DALI wheel, i.e. independently of ov2_megatron's own ShardWriter, so they can hold exactly the
broken entries a foreign shard might (no caption entry, non-UTF-8 bytes, ...).
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image

from ov2_megatron.data.config import index_path_for
from ov2_megatron.data.sample_checks import Issue, check_encoded_jpeg
from ov2_megatron.data.synthetic import SyntheticDataset, ensure_synthetic_dataset

_SESSION_DIR = tempfile.mkdtemp(prefix="ov2-data-tests-")
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)


def session_dir() -> str:
    return _SESSION_DIR


@functools.lru_cache(maxsize=None)
def synthetic_dataset(num_train: int = 96, num_val: int = 40, samples_per_shard: int = 24,
                      image_size: int = 32) -> SyntheticDataset:
    """A small synthetic dataset built once per test session."""
    return ensure_synthetic_dataset(_SESSION_DIR, num_train, num_val, image_size, seed=0,
                                    vocab_size=128, samples_per_shard=samples_per_shard)


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    """A smooth random-colour JPEG (width, height)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    low.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_bytes(seed: int, fmt: str, size: tuple[int, int] = (48, 40)) -> bytes:
    """A smooth random-colour image encoded by PIL as `fmt` ("JPEG", "PNG" or "WEBP")."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    low.resize(size, Image.BICUBIC).save(buf, format=fmt)
    return buf.getvalue()


def write_img2dataset_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A tar as img2dataset writes it: KEY.EXT entries, no DALI index beside it."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def png_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 20, 20)).save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    """A valid GIF: an image format the loader does not read (JPEG, PNG, WebP only)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 200, 20)).save(buf, format="GIF")
    return buf.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    data = jpeg_bytes(seed)
    return data[: len(data) // 2]


def decoder_breaking_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose headers are intact (so the cheap checks pass) but whose entropy-coded data
    is overwritten with random bytes: PIL still decodes it, DALI's decoder raises. Exercises the
    loader's replay-and-blocklist recovery."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    data[300:600] = rng.integers(0, 255, 300, dtype=np.uint8).tobytes()
    data = bytes(data)
    assert check_encoded_jpeg(data, 10**8) == Issue.OK
    return data


def write_raw_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Tar of KEY.EXT entries in the given order, plus its DALI index (via wds2idx)."""
    from wds2idx import IndexCreator

    write_img2dataset_shard(path, samples)
    with IndexCreator(path, index_path_for(path), verbose=False) as creator:
        creator.create_index()
    return path


def caption_tag(text: str) -> int:
    """Sample number from captions of the form 'sample N ...'."""
    return int(text.split()[1])
