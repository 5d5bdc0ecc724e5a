"""DataConfig validation and start-up shard checks (no DALI pipeline is built here)."""

import os
import time

import pytest

from ov2_megatron.data.config import (CLIP_MEAN, DataConfig, find_index_paths,
                                      resolve_shard_spec)
from tests.data.shard_factory import jpeg_bytes, synthetic_dataset, write_raw_shard


def _config(**overrides) -> DataConfig:
    values = dict(train_shards="x.tar", tokenizer_model="t.model", resolution=64)
    values.update(overrides)
    return DataConfig(**values)


@pytest.mark.parametrize("field, value", [
    ("train_shards", ""), ("tokenizer_model", ""), ("resolution", 4), ("caption_length", 3),
    ("crop_scale", (0.5, 1.2)), ("crop_scale", (0.9, 0.5)), ("crop_ratio", (0.0, 1.0)),
    ("color_jitter", -0.1), ("color_jitter", 1.3), ("color_jitter_probability", 1.5),
    ("grayscale_probability", -0.1),
    ("mean", (0.5, 0.5)), ("std", (0.2, 0.0, 0.2)), ("num_threads", 0), ("prefetch", 0),
    ("shuffle_buffer", 0), ("max_image_pixels", 0),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value}).validate()


def test_defaults_are_valid_and_follow_the_reference():
    """The official OpenVision 2 recipe: token_len 128, no flip, simclr_jitter_gray(0.4) with
    p 0.8 / 0.2, ImageNet normalisation (big_vision's vgg_value_range)."""
    config = _config()
    config.validate()
    assert config.caption_length == 128 and config.flip is False
    assert (config.color_jitter, config.color_jitter_probability,
            config.grayscale_probability) == (0.4, 0.8, 0.2)
    assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
    assert CLIP_MEAN == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # still exported
    _config(caption_length=4, color_jitter=1.25, grayscale_probability=1.0).validate()


def test_resolve_glob_directory_and_comma_list(tmp_path):
    paths = [write_raw_shard(str(tmp_path / f"s{i}.tar"), [("a", {"jpg": jpeg_bytes(i),
                                                                  "txt": b"x"})])
             for i in range(3)]
    assert resolve_shard_spec(str(tmp_path)) == paths
    assert resolve_shard_spec(str(tmp_path / "s*.tar")) == paths
    assert resolve_shard_spec(f"{paths[2]}, {paths[0]}") == [paths[2], paths[0]]
    assert find_index_paths(paths) == [p[:-4] + ".idx" for p in paths]
    os.remove(paths[1][:-4] + ".idx")
    assert find_index_paths(paths) is None  # DALI needs all or none


def test_missing_and_invalid_shards_are_named(tmp_path):
    good = write_raw_shard(str(tmp_path / "good.tar"), [("a", {"jpg": jpeg_bytes(0), "txt": b"x"})])
    missing = str(tmp_path / "missing.tar")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        _config(train_shards=f"{good},{missing}").resolve_shards()
    not_tar = tmp_path / "bad.tar"
    not_tar.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="bad.tar.*not a valid tar"):
        resolve_shard_spec(str(not_tar))
    short = tmp_path / "short.tar"
    short.write_bytes(b"")
    with pytest.raises(ValueError, match="short.tar"):
        resolve_shard_spec(str(short))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        resolve_shard_spec(str(tmp_path / "empty_dir"))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        resolve_shard_spec(str(tmp_path / "nothing-*.tar"))


def test_loader_refuses_a_missing_shard_before_building_a_pipeline(tmp_path):
    from ov2_megatron.data.dali_pipeline import ImageCaptionLoader

    data = synthetic_dataset()
    config = _config(train_shards=f"{data.train_dir},{tmp_path / 'gone.tar'}",
                     tokenizer_model=data.tokenizer_model)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=4)
    assert time.perf_counter() - start < 2.0

