"""Weighted dataset mixing: spec forms, weights honoured, determinism, exact resume."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from ov2_megatron.data.config import DataConfig, resolve_shard_spec
from ov2_megatron.data.mixing import ShardSource, mixture_shards, parse_sources
from tests.data.shard_factory import image_bytes, write_img2dataset_shard


def test_plain_and_weighted_spec_forms(tmp_path):
    assert parse_sources("a/*.tar") == [ShardSource("a/*.tar")]
    assert parse_sources(["a/", "b.tar"]) == [ShardSource("a/"), ShardSource("b.tar")]
    weighted = [{"path": "a/", "weight": 3}, {"path": "b/", "weight": 0.5}]
    assert parse_sources(weighted) == [ShardSource("a/", 3.0), ShardSource("b/", 0.5)]
    assert parse_sources(json.dumps(weighted)) == parse_sources(weighted)  # --set form
    for bad, match in (([{"path": "a/", "weight": 0}], "weight"),
                       ([{"path": "a/", "weight": 1}, "b/"], "mixes weighted"),
                       ([{"paths": "a/"}], "must be a path string"), ("[oops", "not JSON")):
        with pytest.raises(ValueError, match=match):
            parse_sources(bad)
    with pytest.raises(ValueError, match="DataConfig.train_shards"):
        DataConfig(train_shards=[{"path": "a/", "weight": -1}], tokenizer_model="t").validate()


def test_mixture_list_honours_weights_without_dropping_samples():
    a = [f"a{i}.tar" for i in range(4)]
    b = [f"b{i}.tar" for i in range(2)]
    counts = {s: 10 for s in a + b}
    shards = mixture_shards([a, b], [1.0, 3.0], counts, seed=0)
    by_source = Counter(s[0] for s in shards)
    assert by_source == {"a": 4, "b": 12}  # 40 : 120 samples = 1 : 3, every "a" sample once
    assert set(shards) == set(a + b)
    assert shards == mixture_shards([a, b], [1.0, 3.0], counts, seed=0)  # deterministic
    with pytest.raises(ValueError, match="repeat"):
        mixture_shards([a, b], [1.0, 10**6], counts, seed=0)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for name, shards in (("a", 4), ("b", 2)):
        os.makedirs(root / name)
        for s in range(shards):
            write_img2dataset_shard(str(root / name / f"{s:05d}.tar"), [
                (f"{name}{s}{i:03d}", {"jpg": image_bytes(i, "JPEG"),
                                       "txt": f"{name} {s * 6 + i} good".encode()})
                for i in range(6)])
    return str(root)


def _loader(root, tokenizer_model, weights, state=None, seed=5):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (absent on the GPU box)")
    from ov2_megatron.data.dali_pipeline import ImageCaptionLoader

    spec = [{"path": os.path.join(root, "a"), "weight": weights[0]},
            {"path": os.path.join(root, "b"), "weight": weights[1]}]
    cfg = DataConfig(train_shards=spec, tokenizer_model=tokenizer_model, resolution=16,
                     caption_length=12, num_threads=1, shuffle_buffer=8, seed=seed,
                     color_jitter=0.0, grayscale_probability=0.0)
    return ImageCaptionLoader(cfg, dp_rank=0, dp_size=1, batch_size=8, device="cpu",
                              resume_state=state)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    from ov2_megatron.data.tokenizer import train_tokenizer

    return train_tokenizer([f"{n} {i} good" for n in "ab" for i in range(50)],
                           str(tmp_path_factory.mktemp("tok") / "tok"), 64)


def test_loader_mixes_by_weight_and_resumes_exactly(two_sources, tokenizer_model):
    assert len(resolve_shard_spec([{"path": os.path.join(two_sources, "a"), "weight": 1}])) == 4
    loader = _loader(two_sources, tokenizer_model, (1.0, 3.0))  # 24 : 72 samples an epoch
    source, tokens, state = Counter(), [], None
    for step in range(24):  # two mixed epochs of 96
        batch = next(loader)
        tokens.append(batch["tokens"])
        source.update(loader.tokenizer.decode(row).split()[0] for row in batch["tokens"])
        if step == 7:
            state = loader.state()
    assert abs(source["b"] / sum(source.values()) - 0.75) < 0.05, source
    resumed = _loader(two_sources, tokenizer_model, (1.0, 3.0), state)
    for step in range(8, 24):
        assert np.array_equal(next(resumed)["tokens"], tokens[step]), step
    other_seed = _loader(two_sources, tokenizer_model, (1.0, 3.0), seed=6)
    assert not all(np.array_equal(next(other_seed)["tokens"], t) for t in tokens[:3])
    with pytest.raises(ValueError, match="resume_state has shards="):
        _loader(two_sources, tokenizer_model, (1.0, 1.0), state)  # a changed weight
