"""The DALI loader against independent references: PIL pixels, shard contents, TF's colour
ops (tf_color_ops.py), its own uninterrupted stream. Real DALI on the CPU (device="cpu"), tiny
images, small batches."""

import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (absent on the GPU box)")

from ov2_megatron.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from ov2_megatron.data.dali_pipeline import ImageCaptionLoader
from ov2_megatron.data.synthetic import synthetic_sample
from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer
from tests.data import tf_color_ops
from tests.data.shard_factory import (
    caption_tag,
    decoder_breaking_jpeg,
    gif_bytes,
    jpeg_bytes,
    synthetic_dataset,
    truncated_jpeg,
    write_raw_shard,
)

W, H = 48, 40  # test image size (width, height)
ONE_LEVEL = 1.01 / 255 / min(IMAGENET_STD)  # one 8-bit level after normalisation, + rounding
NO_COLOR = dict(color_jitter=0.0, grayscale_probability=0.0)  # crop + resize pixels only


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    captions = [f"sample {i} good" for i in range(200)]
    return train_tokenizer(captions, str(tmp_path_factory.mktemp("tok") / "tok"), 64)


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory):
    """96 good samples 'sample i good' in 4 tars of 24."""
    root = tmp_path_factory.mktemp("numbered")
    for s in range(4):
        write_raw_shard(str(root / f"part-{s}.tar"), [
            (f"{i:05d}", {"jpg": jpeg_bytes(i, (W, H)), "txt": f"sample {i} good".encode()})
            for i in range(24 * s, 24 * (s + 1))])
    return str(root)


def make_config(shards, tokenizer_model, **overrides) -> DataConfig:
    values = dict(train_shards=shards, val_shards=shards, tokenizer_model=tokenizer_model,
                  resolution=32, caption_length=16, num_threads=2, shuffle_buffer=32, seed=1)
    values.update(overrides)
    return DataConfig(**values)


def normalized_pil(image: Image.Image) -> np.ndarray:
    """[3, h, w] float: ToTensor + Normalize with the (default) ImageNet constants."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return ((pixels - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


def uint8_pixels(config: DataConfig, images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: [B, 3, R, R] float -> [B, R, R, 3] uint8, as DALI had them."""
    mean = np.array(config.mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.array(config.std, dtype=np.float64).reshape(1, 3, 1, 1)
    pixels = np.round((images.numpy().astype(np.float64) * std + mean) * 255)
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def captions_of(loader, batch) -> list[int]:
    return [caption_tag(loader.tokenizer.decode(row)) for row in batch["tokens"]]


def test_eval_pixels_equal_pil_decode_and_center_crop(numbered_shards, tokenizer_model):
    config = make_config(numbered_shards, tokenizer_model, resolution=H,  # jitter: train only
                         eval_resize="shortest")
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8, training=False,
                                device="cpu")
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, H, H) and batch["images"].dtype == torch.float32
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (8, 16)
    left = (W - H) // 2
    for row, caption in enumerate(batch["captions"]):
        index = caption_tag(caption)
        reference = normalized_pil(Image.open(io.BytesIO(jpeg_bytes(index, (W, H)))))
        got = batch["images"][row].numpy()
        # Both decode with libjpeg-turbo (islow IDCT, fancy upsampling): identical pixels, so
        # only float rounding of the normalisation remains.
        assert np.abs(got - reference[:, :, left:left + H]).max() < 1e-4


def test_eval_centre_crop_floors_an_odd_margin(tmp_path, tokenizer_model):
    """The official central_crop offset is (side - R) // 2: a 47 px wide image cropped to 40
    starts at column 3 (DALI's plain crop_pos 0.5 would start at 4)."""
    shard = write_raw_shard(str(tmp_path / "odd.tar"), [
        (f"{i:05d}", {"jpg": jpeg_bytes(i, (47, 40)), "txt": f"sample {i} good".encode()})
        for i in range(4)])
    config = make_config(shard, tokenizer_model, resolution=40, eval_resize="shortest")
    batch = next(iter(ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=4,
                                         training=False, device="cpu")))
    for row, caption in enumerate(batch["captions"]):
        reference = normalized_pil(Image.open(io.BytesIO(jpeg_bytes(caption_tag(caption),
                                                                    (47, 40)))))
        assert np.abs(batch["images"][row].numpy() - reference[:, :, 3:43]).max() < 1e-4


def test_eval_resize_and_train_full_crop_match_pil_resize(numbered_shards, tokenizer_model):
    size = 20
    eval_config = make_config(numbered_shards, tokenizer_model, resolution=size,
                              eval_resize="shortest")
    batch = next(iter(ImageCaptionLoader(eval_config, dp_rank=0, dp_size=1, batch_size=4,
                                         training=False, device="cpu")))
    scaled_w = round(W * size / H)  # resize shorter side to 20 -> 24 x 20, then center crop
    for row, caption in enumerate(batch["captions"]):
        image = Image.open(io.BytesIO(jpeg_bytes(caption_tag(caption), (W, H))))
        reference = normalized_pil(image.resize((scaled_w, size), Image.BILINEAR))
        left = (scaled_w - size) // 2
        diff = np.abs(batch["images"][row].numpy() - reference[:, :, left:left + size])
        assert diff.mean() < 0.005 and diff.max() < ONE_LEVEL  # two bilinear resamplers
    # Training with the crop pinned to the whole image and no colour ops: random-resized-crop
    # == plain resize, the pixels the loader gave before the colour jitter existed.
    train_config = make_config(numbered_shards, tokenizer_model, resolution=size,
                               crop_scale=(1.0, 1.0), crop_ratio=(W / H, W / H), **NO_COLOR)
    loader = ImageCaptionLoader(train_config, dp_rank=0, dp_size=1, batch_size=4, device="cpu")
    batch = next(loader)
    for row, index in enumerate(captions_of(loader, batch)):
        image = Image.open(io.BytesIO(jpeg_bytes(index, (W, H))))
        reference = normalized_pil(image.resize((size, size), Image.BILINEAR))
        diff = np.abs(batch["images"][row].numpy() - reference)
        assert diff.mean() < 0.005 and diff.max() < ONE_LEVEL


def test_eval_squash_is_the_transform_every_export_declares(numbered_shards, tokenizer_model):
    """By default evaluation squashes the whole image to the square input, as
    data/preprocess.py's EvalTransform (which the timm / HF / OpenCLIP configs derive from)
    does; DALI's and PIL's bilinear resamplers differ by less than one 8-bit level."""
    from ov2_megatron.data.preprocess import EvalTransform

    size = 20
    config = make_config(numbered_shards, tokenizer_model, resolution=size)
    assert config.eval_resize == "squash"
    batch = next(iter(ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=4,
                                         training=False, device="cpu")))
    transform = EvalTransform(size, config.mean, config.std)
    for row, caption in enumerate(batch["captions"]):
        image = Image.open(io.BytesIO(jpeg_bytes(caption_tag(caption), (W, H)))).convert("RGB")
        diff = np.abs(batch["images"][row].numpy() - transform(image))
        assert diff.mean() < 0.005 and diff.max() < ONE_LEVEL
    with pytest.raises(ValueError, match="eval_resize='crop'"):
        make_config(numbered_shards, tokenizer_model, eval_resize="crop").validate()


def test_stream_is_a_function_of_the_seed(numbered_shards, tokenizer_model):
    config = make_config(numbered_shards, tokenizer_model, crop_scale=(0.2, 0.5))
    first = [next(ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8, device="cpu"))
             for _ in range(2)]
    assert torch.equal(first[0]["images"], first[1]["images"])
    assert torch.equal(first[0]["tokens"], first[1]["tokens"])
    other = make_config(numbered_shards, tokenizer_model, crop_scale=(0.2, 0.5), seed=2)
    different = next(ImageCaptionLoader(other, dp_rank=0, dp_size=1, batch_size=8, device="cpu"))
    assert not torch.equal(different["tokens"], first[0]["tokens"])
    tokenizer = CaptionTokenizer.from_file(tokenizer_model)
    order = [caption_tag(tokenizer.decode(row)) for row in first[0]["tokens"]]
    assert order != list(range(8)) and len(set(order)) == 8  # shuffled, no repeats


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_are_disjoint_and_complete(numbered_shards, tokenizer_model, dp_size):
    config = make_config(numbered_shards, tokenizer_model, resolution=16)
    per_rank = 96 // dp_size
    train_seen, eval_seen = [], []
    for rank in range(dp_size):
        loader = ImageCaptionLoader(config, dp_rank=rank, dp_size=dp_size, batch_size=8,
                                    device="cpu")
        train_seen.append([i for _ in range(per_rank // 8) for i in captions_of(loader,
                                                                                 next(loader))])
        evaluator = ImageCaptionLoader(config, dp_rank=rank, dp_size=dp_size, batch_size=7,
                                       training=False, device="cpu")
        eval_seen.append([caption_tag(c) for batch in evaluator for c in batch["captions"]])
    for seen in (train_seen, eval_seen):
        assert [len(s) for s in seen] == [per_rank] * dp_size
        assert sorted(i for s in seen for i in s) == list(range(96))  # disjoint and complete
    assert eval_seen[0] == list(range(per_rank))  # eval: stored order, no shuffle


@pytest.mark.parametrize("dp_rank, dp_size, save_after", [(0, 1, 7), (1, 2, 4)])
def test_resume_continues_the_exact_stream(numbered_shards, tokenizer_model, dp_rank, dp_size,
                                           save_after):
    # The official colour augmentation (the defaults, spelled out): its random draws are DALI
    # state too and must resume with the crops.
    config = make_config(numbered_shards, tokenizer_model, resolution=16, crop_scale=(0.3, 1.0),
                         flip=True, color_jitter=0.4, color_jitter_probability=0.8,
                         grayscale_probability=0.2)
    total = 96 // dp_size // 8 * 2 + 3  # past two epoch boundaries
    loader = ImageCaptionLoader(config, dp_rank=dp_rank, dp_size=dp_size, batch_size=8,
                                device="cpu")
    stream, state = [], None
    for step in range(total):
        stream.append(next(loader))
        if step == save_after:
            state = pickle.loads(pickle.dumps(loader.state()))
    resumed = ImageCaptionLoader(config, dp_rank=dp_rank, dp_size=dp_size, batch_size=8,
                                 resume_state=state, device="cpu")
    for step in range(save_after + 1, total):
        batch = next(resumed)
        assert torch.equal(batch["images"], stream[step]["images"]), step
        assert torch.equal(batch["tokens"], stream[step]["tokens"]), step
    assert resumed.totals() == loader.totals() and loader.stats() == {}


def test_grayscale_only_is_tf_gray_of_the_same_crops(numbered_shards, tokenizer_model):
    """grayscale_probability 1 without jitter: every image is TF's rgb_to_grayscale of the
    image the colourless stream gives (same seed): the colour ops draw nothing the crop uses."""
    plain, gray = (ImageCaptionLoader(make_config(numbered_shards, tokenizer_model, **colors),
                                      dp_rank=0, dp_size=1, batch_size=8, device="cpu")
                   for colors in (NO_COLOR, dict(color_jitter=0.0, grayscale_probability=1.0)))
    for _ in range(3):
        expected, got = next(plain), next(gray)
        assert torch.equal(expected["tokens"], got["tokens"])
        for before, after in zip(uint8_pixels(plain.config, expected["images"]),
                                 uint8_pixels(gray.config, got["images"]), strict=True):
            reference = tf_color_ops.rgb_to_grayscale(before.astype(np.float32) / 255)
            reference = np.clip(reference * np.float32(255), 0, 255).astype(np.uint8)
            assert np.array_equal(after, reference)


def test_default_color_augmentation_rates(numbered_shards, tokenizer_model):
    """The default config (official 0.4 / 0.8 / 0.2) over 5 epochs against the colourless
    stream of the same seed: 0.2 of the images gray, 0.8 * 0.2 untouched, the rest jittered;
    tolerances 4 binomial standard deviations."""
    defaults = DataConfig()
    assert (defaults.color_jitter, defaults.color_jitter_probability,
            defaults.grayscale_probability) == (0.4, 0.8, 0.2)
    plain, jittered = (ImageCaptionLoader(make_config(numbered_shards, tokenizer_model,
                                                      resolution=16, **colors),
                                          dp_rank=0, dp_size=1, batch_size=16, device="cpu")
                       for colors in (NO_COLOR, {}))
    gray = untouched = 0
    n = 480
    for _ in range(n // 16):
        before = uint8_pixels(plain.config, next(plain)["images"])
        after = uint8_pixels(jittered.config, next(jittered)["images"])
        for x, y in zip(before, after, strict=True):
            is_gray = bool((y[..., 0] == y[..., 1]).all() and (y[..., 1] == y[..., 2]).all())
            gray += is_gray
            untouched += np.array_equal(x, y)
    for count, p in ((gray, 0.2), (untouched, 0.16)):
        assert abs(count / n - p) < 4 * np.sqrt(p * (1 - p) / n), (count, p)


def test_resume_refuses_another_layout(numbered_shards, tokenizer_model):
    config = make_config(numbered_shards, tokenizer_model, resolution=16)
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=2, batch_size=8, device="cpu")
    next(loader)
    state = loader.state()
    with pytest.raises(ValueError, match="dp_size=2.*dp_size=4"):
        ImageCaptionLoader(config, dp_rank=0, dp_size=4, batch_size=8, resume_state=state,
                           device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        ImageCaptionLoader(config, dp_rank=0, dp_size=2, batch_size=4, resume_state=state,
                           device="cpu")
    # Colour ops on/off change the DALI graph: refused with the reason, not DALI's "unknown
    # operator". A state from before the colour ops existed (no key) is a colourless one.
    plain = make_config(numbered_shards, tokenizer_model, resolution=16, **NO_COLOR)
    with pytest.raises(ValueError, match="color_ops='jitter' but this loader has "
                                         "color_ops='none'"):
        ImageCaptionLoader(plain, dp_rank=0, dp_size=2, batch_size=8, resume_state=state,
                           device="cpu")
    fresh = ImageCaptionLoader(plain, dp_rank=0, dp_size=2, batch_size=8, device="cpu")
    legacy = {k: v for k, v in fresh.state().items() if k != "color_ops"}
    resumed = ImageCaptionLoader(plain, dp_rank=0, dp_size=2, batch_size=8,
                                 resume_state=legacy, device="cpu")
    assert torch.equal(next(resumed)["images"], next(fresh)["images"])


@pytest.fixture(scope="module")
def dirty_shard(tmp_path_factory):
    """16 good samples and one of every bad kind, interleaved."""
    big = io.BytesIO()
    Image.new("RGB", (100, 100), (9, 9, 9)).save(big, format="JPEG")
    bad = [
        {"jpg": truncated_jpeg(100), "txt": b"sample 100 bad"},
        {"jpg": gif_bytes(), "txt": b"sample 101 bad"},  # a PNG here would be fine now
        {"jpg": b"", "txt": b"sample 102 bad"},
        {"jpg": jpeg_bytes(103, (W, H))},  # no caption entry
        {"jpg": jpeg_bytes(104, (W, H)), "txt": b"   "},
        {"jpg": jpeg_bytes(105, (W, H)), "txt": "sample 105 café".encode("latin-1")},
        {"jpg": big.getvalue(), "txt": b"sample 106 bad"},
        {"txt": b"sample 107 bad"},  # no image entry
        {"jpg": decoder_breaking_jpeg(), "txt": b"sample 108 bad"},
    ]
    samples = []
    for i in range(16):
        samples.append((f"{len(samples):05d}", {"jpg": jpeg_bytes(i, (W, H)),
                                                 "txt": f"sample {i} good".encode()}))
        if i < len(bad):
            samples.append((f"{len(samples):05d}", bad[i]))
    root = tmp_path_factory.mktemp("dirty")
    return write_raw_shard(str(root / "dirty.tar"), samples)


EXPECTED_ISSUES = {"truncated_image": 1, "unsupported_image": 1, "empty_image": 2,
                   "no_caption": 2, "caption_not_utf8": 1, "oversized_image": 1, "undecodable": 1}


def test_bad_samples_are_replaced_counted_and_resumable(dirty_shard, tokenizer_model):
    config = make_config(dirty_shard, tokenizer_model, resolution=16, max_image_pixels=5000)
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=5, device="cpu")
    stream, state = [], None
    for step in range(10):  # 25 samples = 5 batches an epoch; two epochs
        stream.append(next(loader))
        if step == 1:
            state = loader.state()
        if step == 4:
            assert loader.stats() == EXPECTED_ISSUES
            assert sum(loader.stats().values()) == 9
            assert loader.totals() == {"samples": 25, "replaced": 9, "dropped": 0,
                                       "batches_skipped": 0, "recoveries": 1}
            epoch = [i for batch in stream for i in captions_of(loader, batch)]
            assert set(epoch) == set(range(16))  # every good sample, nothing bad
    assert loader.stats()["undecodable"] == 2 and loader.totals()["recoveries"] == 1
    for batch in stream:  # a replaced row is a copy of a good row of the same batch
        tags = captions_of(loader, batch)
        for row, tag in enumerate(tags):
            assert torch.equal(batch["images"][row], batch["images"][tags.index(tag)])
    resumed = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=5, device="cpu",
                                 resume_state=state)
    for step in range(2, 10):
        batch = next(resumed)
        assert torch.equal(batch["images"], stream[step]["images"]), step
        assert torch.equal(batch["tokens"], stream[step]["tokens"]), step
    assert resumed.stats() == loader.stats() and resumed.totals() == loader.totals()


def test_eval_drops_bad_samples(dirty_shard, tokenizer_model):
    config = make_config(dirty_shard, tokenizer_model, resolution=16, max_image_pixels=5000)
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=6, training=False,
                                device="cpu")
    for _ in range(2):  # each iter() is one full pass
        captions = [c for batch in loader for c in batch["captions"]]
        assert captions == [f"sample {i} good" for i in range(16)]
    assert loader.stats() == {k: 2 * v for k, v in EXPECTED_ISSUES.items()}
    assert loader.totals()["dropped"] == 18 and loader.totals()["samples"] == 50


def test_device_selection(numbered_shards, tokenizer_model):
    config = make_config(numbered_shards, tokenizer_model, resolution=16)
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=4, device="auto")
    assert loader.device == ("gpu" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=4, device="tpu")


@pytest.mark.gpu
def test_mixed_gpu_decoding_matches_cpu(numbered_shards, tokenizer_model):
    pytest.importorskip("nvidia.dali", reason="GPU box without the DALI wheel")
    config = make_config(numbered_shards, tokenizer_model, resolution=H)
    cpu = next(iter(ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8,
                                       training=False, device="cpu")))
    gpu = next(iter(ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8,
                                       training=False, device="gpu")))
    assert gpu["images"].is_cuda and gpu["tokens"].is_cuda
    assert gpu["captions"] == cpu["captions"]
    # nvJPEG (with libjpeg's fancy upsampling requested) and libjpeg-turbo may still differ
    # by an 8-bit level at some pixels (IDCT rounding).
    diff = (gpu["images"].cpu() - cpu["images"]).abs()
    assert diff.mean() < 0.5 * ONE_LEVEL and diff.max() < 4 * ONE_LEVEL
    assert torch.equal(gpu["tokens"].cpu(), cpu["tokens"])


def test_state_before_the_first_batch_and_shards_without_index(numbered_shards,
                                                               tokenizer_model, tmp_path):
    for name in os.listdir(numbered_shards):
        if name.endswith(".tar"):  # no .idx: DALI scans the tars itself at start-up
            shutil.copy(os.path.join(numbered_shards, name), tmp_path / name)
    config = make_config(str(tmp_path), tokenizer_model, resolution=16)
    fresh = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8, device="cpu")
    state = fresh.state()
    expected = [next(fresh) for _ in range(3)]
    resumed = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8, device="cpu",
                                 resume_state=state)
    for batch in expected:
        assert torch.equal(next(resumed)["images"], batch["images"])
    indexed = ImageCaptionLoader(make_config(numbered_shards, tokenizer_model, resolution=16),
                                 dp_rank=0, dp_size=1, batch_size=8, device="cpu")
    assert torch.equal(next(indexed)["tokens"], expected[0]["tokens"])  # same stream either way


def test_shards_written_by_our_writer_load_in_order():
    """The synthetic set goes through ShardWriter (own index, .json sidecars): the eval stream
    must return exactly the generator's captions, in order."""
    data = synthetic_dataset()
    config = DataConfig(train_shards=data.train_dir, val_shards=data.val_dir,
                        tokenizer_model=data.tokenizer_model, resolution=data.image_size,
                        num_threads=2)
    loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=16, training=False,
                                device="cpu")
    batches = list(loader)
    captions = [c for batch in batches for c in batch["captions"]]
    assert captions == [synthetic_sample(i, 1, 0, data.image_size)[1] for i in range(data.num_val)]
    first = Image.open(io.BytesIO(synthetic_sample(0, 1, 0, data.image_size)[0]))
    assert np.abs(batches[0]["images"][0].numpy() - normalized_pil(first)).max() < 1e-4
    assert [loader.tokenizer.decode(row) for row in batches[0]["tokens"]] == captions[:16]


def test_the_loader_says_where_it_decodes_and_why(numbered_shards, tokenizer_model):
    """On a machine without CUDA, "auto" falls back to the CPU decoder, saying so; the GPU
    decoder's settings (hw_decoder_load) are validated like every field."""
    config = make_config(numbered_shards, tokenizer_model, resolution=16)
    auto = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8)
    if torch.cuda.is_available():
        assert auto.decoding.startswith("decoding on the GPU (DALI mixed")
    else:
        assert auto.device == "cpu" and auto.decoding.endswith(": no CUDA device"), auto.decoding
    chosen = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8, device="cpu")
    assert chosen.decoding.endswith("device='cpu' asked for"), chosen.decoding
    assert "2 threads per rank" in chosen.decoding
    with pytest.raises(ValueError, match="hw_decoder_load 1.5 is not a fraction"):
        make_config(numbered_shards, tokenizer_model, hw_decoder_load=1.5).validate()


def test_dont_use_mmap_reads_the_same_stream_without_mapping_a_shard(numbered_shards,
                                                                     tokenizer_model):
    """data.dont_use_mmap (network file systems, 65k+ shards): plain reads give the batches
    the mapped reader gives, and no shard is mapped into the process."""
    def mapped_shards() -> int:
        with open("/proc/self/maps") as f:
            return sum(line.rstrip().endswith(".tar") for line in f)

    def first_batches(config):
        loader = ImageCaptionLoader(config, dp_rank=0, dp_size=1, batch_size=8, device="cpu")
        batches = [next(loader) for _ in range(3)]
        return batches, mapped_shards()

    mapped, maps_with = first_batches(make_config(numbered_shards, tokenizer_model))
    plain, maps_without = first_batches(make_config(numbered_shards, tokenizer_model,
                                                    dont_use_mmap=True))
    assert maps_with > 0 and maps_without == 0
    for a, b in zip(mapped, plain):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
