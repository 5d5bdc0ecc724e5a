"""Bad data is loud and bounded: header checks of PNG/WebP, per-reason counts, the window
warning, a clear error (naming the shard) for an all-bad shard set, and signals still heard."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (absent on the GPU box)")

from ov2_megatron.data.bad_data import BadDataError, BadDataMonitor  # noqa: E402
from ov2_megatron.data.config import DataConfig  # noqa: E402
from ov2_megatron.data.dali_pipeline import ImageCaptionLoader  # noqa: E402
from ov2_megatron.data.sample_checks import Issue, check_encoded_image  # noqa: E402
from ov2_megatron.data.tokenizer import train_tokenizer  # noqa: E402
from tests.data.shard_factory import gif_bytes, image_bytes, write_img2dataset_shard  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_tokenizer([f"sample {i} good" for i in range(100)],
                           str(tmp_path_factory.mktemp("tok") / "tok"), 64)


def config(shards, tokenizer_model, **overrides) -> DataConfig:
    values = dict(train_shards=shards, val_shards=shards, tokenizer_model=tokenizer_model,
                  resolution=16, caption_length=12, num_threads=1, shuffle_buffer=8, seed=0,
                  color_jitter=0.0, grayscale_probability=0.0)
    return DataConfig(**{**values, **overrides})


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_header_checks_accept_real_images_and_catch_cut_ones(fmt):
    data = image_bytes(0, fmt, (48, 40))
    assert check_encoded_image(data, 10**6) == Issue.OK
    assert check_encoded_image(data, 48 * 40 - 1) == Issue.OVERSIZED_IMAGE
    for cut in (0.3, 0.7, 0.95):
        assert check_encoded_image(data[: int(len(data) * cut)], 10**6) in (
            Issue.TRUNCATED_IMAGE, Issue.CORRUPT_IMAGE), cut


def test_header_checks_of_lossless_webp_and_other_formats():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGBA", (30, 20), (1, 2, 3, 4)).save(buf, format="WEBP", lossless=True)
    assert check_encoded_image(buf.getvalue(), 600) == Issue.OK
    assert check_encoded_image(buf.getvalue(), 599) == Issue.OVERSIZED_IMAGE
    assert check_encoded_image(gif_bytes(), 10**6) == Issue.UNSUPPORTED_IMAGE
    assert check_encoded_image(b"", 10**6) == Issue.EMPTY_IMAGE


def _good(i: int) -> dict[str, bytes]:
    return {"webp" if i % 2 else "png": image_bytes(i, "WEBP" if i % 2 else "PNG"),
            "json": json.dumps({"re_caption": f"sample {i} good"}).encode()}


BAD = {  # one of each kind, read with caption_key="re_caption"
    "caption_field_missing": {"jpg": image_bytes(90, "JPEG"), "json": b'{"caption": "x"}'},
    "not_json": {"jpg": image_bytes(91, "JPEG"), "json": b"{not json"},
    "no_caption": {"jpg": image_bytes(92, "JPEG"), "json": b'{"re_caption": "  "}'},
    "no_image": {"json": b'{"re_caption": "sample 93 bad"}'},
    "gif": {"gif": gif_bytes(), "json": b'{"re_caption": "sample 94 bad"}'},
    "cut_png": {"png": image_bytes(95, "PNG")[:200], "json": b'{"re_caption": "sample 95 bad"}'},
    "cut_webp": {"webp": image_bytes(96, "WEBP")[:60], "json": b'{"re_caption": "s 96 bad"}'},
}
EXPECTED = {"caption_field_missing": 2, "no_caption": 1, "empty_image": 2,
            "truncated_image": 2}  # a .gif entry is not an image extension: no image entry


def test_per_reason_counts_and_eval_keeps_only_good(tmp_path, tokenizer_model):
    samples = []
    for i in range(8):
        samples.append((f"{len(samples):05d}", _good(i)))
        if i < len(BAD):
            samples.append((f"{len(samples):05d}", list(BAD.values())[i]))
    shard = write_img2dataset_shard(str(tmp_path / "mixed.tar"), samples)
    loader = ImageCaptionLoader(config(shard, tokenizer_model, caption_key="re_caption"),
                                dp_rank=0, dp_size=1, batch_size=5, training=False, device="cpu")
    captions = [c for batch in loader for c in batch["captions"]]
    assert captions == [f"sample {i} good" for i in range(8)]
    assert loader.stats() == EXPECTED
    assert loader.totals()["dropped"] == 7
    cfg = config(shard, tokenizer_model, caption_key="re_caption", image_extensions=("gif",),
                 bad_sample_window=10)
    only_gif = ImageCaptionLoader(cfg, dp_rank=0, dp_size=1, batch_size=5, training=False,
                                  device="cpu")
    with pytest.raises(BadDataError):  # 14 of 15 have no .gif; the GIF itself is unsupported
        list(only_gif)


def _json_only_shards(root, shards: int = 3) -> str:
    """The user's case: Recap-DataComp-style shards, captions only in .json."""
    os.makedirs(root, exist_ok=True)
    for s in range(shards):
        write_img2dataset_shard(str(root / f"{s:05d}.tar"), [
            (f"{s}{i:04d}", {"jpg": image_bytes(i, "JPEG"),
                             "json": json.dumps({"re_caption": f"sample {i} good"}).encode()})
            for i in range(8)])
    return str(root)


def test_all_bad_shards_raise_a_clear_error_fast(tmp_path, tokenizer_model):
    root = _json_only_shards(tmp_path / "json_only")
    started = time.monotonic()
    loader = ImageCaptionLoader(config(root, tokenizer_model, bad_sample_window=64), dp_rank=0,
                                dp_size=1, batch_size=8, device="cpu")
    with pytest.raises(BadDataError) as info:
        next(loader)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "no_caption 64" in message and "data.caption_key" in message
    assert os.path.join(root, "00000.tar") in message  # names the shards
    fixed = ImageCaptionLoader(config(root, tokenizer_model, caption_key="re_caption"),
                               dp_rank=0, dp_size=1, batch_size=8, device="cpu")
    next(fixed)
    assert fixed.stats() == {}


def test_warning_names_reason_when_a_window_is_too_bad(tmp_path, tokenizer_model):
    samples = []
    for i in range(12):
        parts = {"jpg": image_bytes(i, "JPEG")}
        if i % 4:  # every fourth sample has no caption
            parts["txt"] = f"sample {i} good".encode()
        samples.append((f"{i:05d}", parts))
    shard = write_img2dataset_shard(str(tmp_path / "quarter.tar"), samples)
    cfg = config(shard, tokenizer_model, bad_sample_window=12, bad_sample_warn_fraction=0.2)
    loader = ImageCaptionLoader(cfg, dp_rank=0, dp_size=1, batch_size=4, device="cpu")
    with pytest.warns(UserWarning, match=r"3 of the last 12 samples.*no_caption 3.*quarter\.tar"):
        for _ in range(3):
            next(loader)
    quiet = ImageCaptionLoader(config(shard, tokenizer_model, bad_sample_window=12,
                                      bad_sample_warn_fraction=0.3),
                               dp_rank=0, dp_size=1, batch_size=4, device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            next(quiet)


def test_monitor_error_is_bounded_by_the_window():
    monitor = BadDataMonitor(window=10, warn_fraction=1.0)
    monitor.update([Issue.NO_CAPTION] * 6, ["/d/a.tar:512:k.jpg"] * 6)
    monitor.update([Issue.OK] + [Issue.NO_CAPTION] * 5, [""] + ["/d/b.tar:0:x.jpg"] * 5)
    with pytest.raises(BadDataError, match=r"last 10 samples.*/d/b\.tar \(5\)"):
        monitor.update([Issue.NO_CAPTION] * 5, ["/d/b.tar:0:x.jpg"] * 5)


def test_stop_signal_reaches_python_while_every_sample_is_bad(tmp_path, tokenizer_model):
    """The trainer's SIGTERM/SIGUSR1 handlers (loop.StopRequested: set a flag) run between
    batches while the loader skips all-bad ones, and the skipping itself ends (the window)."""
    root = _json_only_shards(tmp_path / "json_only")
    loader = ImageCaptionLoader(config(root, tokenizer_model, bad_sample_window=4000),
                                dp_rank=0, dp_size=1, batch_size=8, device="cpu")
    handled = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(
        time.monotonic()))
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    started = time.monotonic()
    try:
        timer.start()
        with pytest.raises(BadDataError):
            next(loader)  # 500 all-bad batches before the window error
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    failed = time.monotonic()
    assert failed - started < 30
    if failed - started > 0.5:  # the signal came while the loader was still skipping
        assert handled and handled[0] < failed


def test_progress_line_and_metrics_show_bad_samples_by_reason(tmp_path, capsys):
    from ov2_megatron.training.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), total_steps=4, enabled=True)
    logger.interactive = False
    logger.log(1, dict(loss=2.0, skipped=0, bad_samples={"no_caption": 9, "undecodable": 100}))
    logger.log(2, dict(loss=2.0, skipped=0, bad_samples={}))
    logger.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("| nonfinite_steps_skipped 0 | bad_samples 109 (undecodable 100, "
                             "no_caption 9) | ETA unknown")
    assert "bad_samples" not in lines[1]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["bad_samples"] == 109 and first["bad_samples/no_caption"] == 9
