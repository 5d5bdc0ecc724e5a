"""Distributed checkpoints written at TP=2 and PP=2 -> timm and Hugging Face folders, loaded
with the real packages (.venv-convert): their patch tokens and pooled features equal this
framework's encode() within 1e-5 (fp32) on random images.

TP=2: sin-cos positions, no registers -> timm VisionTransformer, HF ViTModel.
PP=2: learned positions + 2 registers -> timm VisionTransformer (reg_tokens), HF
Dinov2WithRegistersModel; timm also at another resolution (the learned table resized).
"""

import json
import os

import numpy as np
from safetensors.numpy import load_file

from tests.conversion.conftest import assert_features_close, run_tools, third_party


def _round_trip(run_dir, pixels, convert_python, tmp_path, want_hf_class, more=(),
                third_party_jobs=()):
    timm_dir, hf_dir = str(tmp_path / "timm"), str(tmp_path / "hf")
    ours_file = str(tmp_path / "ours.safetensors")
    results = run_tools(
        ("convert_checkpoint", ["export-timm", "--checkpoint", run_dir, "--output", timm_dir]),
        ("convert_checkpoint", ["export-hf", "--checkpoint", run_dir, "--output", hf_dir]),
        ("extract_features", ["--checkpoint", run_dir, "--pixels", pixels, "--output",
                              ours_file, "--batch-size", "3"]), *more)
    assert "4/4" in results[2][2]  # the progress bar counted every image
    ours = load_file(ours_file)
    size = np.load(pixels).shape[-1]
    assert ours["patch_tokens"].shape == (4, (size // 8) ** 2, 128)
    assert ours["pooled"].shape == (4, 128)
    assert sorted(os.listdir(timm_dir)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors",
                                          "preprocessor_config.json"]
    timm, hf, *rest = third_party(
        convert_python, ("timm", timm_dir, pixels, str(tmp_path / "timm_out")),
        ("hf", hf_dir, pixels, str(tmp_path / "hf_out")), *third_party_jobs)
    assert timm["info"]["model_class"] == "VisionTransformer"
    assert hf["info"]["model_class"] == want_hf_class
    with open(os.path.join(run_dir, "config.json")) as f:
        data = json.load(f)["data"]
    assert hf["info"]["image_mean"] == data["mean"] and hf["info"]["image_std"] == data["std"]
    return (assert_features_close(ours, timm, "timm"), assert_features_close(ours, hf, "hf"),
            timm, hf, rest)


def test_tp2_checkpoint_to_timm_and_hf(tp2_run, pixels, convert_python, tmp_path):
    timm_diff, hf_diff, timm, _, _ = _round_trip(tp2_run, pixels, convert_python, tmp_path,
                                                 "ViTModel")
    assert timm["info"]["num_prefix_tokens"] == 1
    print(f"TP=2 max |diff|: timm {timm_diff:.2e}, hf {hf_diff:.2e}")


def test_pp2_checkpoint_with_registers_to_timm_and_hf(pp2_run, pixels, convert_python,
                                                      tmp_path):
    """Also at another resolution: --image-size materialises the learned table resized for
    that grid (as encode() resizes it), so the export is exact there too."""
    size = 64
    pixels64, timm64 = str(tmp_path / "pixels64.npy"), str(tmp_path / "timm64")
    ours64 = str(tmp_path / "ours64.safetensors")
    np.save(pixels64, np.random.default_rng(1).standard_normal((2, 3, size, size), np.float32))
    more = (("convert_checkpoint", ["export-timm", "--checkpoint", pp2_run, "--output", timm64,
                                    "--image-size", str(size)]),
            ("extract_features", ["--checkpoint", pp2_run, "--pixels", pixels64, "--output",
                                  ours64, "--no-progress"]))
    timm_diff, hf_diff, timm, hf, (timm_at64,) = _round_trip(
        pp2_run, pixels, convert_python, tmp_path, "Dinov2WithRegistersModel", more,
        [("timm", timm64, pixels64, str(tmp_path / "timm64_out"))])
    assert timm["info"]["num_prefix_tokens"] == hf["info"]["num_prefix_tokens"] == 3
    with open(os.path.join(timm64, "config.json")) as f:
        assert json.load(f)["model_args"]["img_size"] == size
    at64 = assert_features_close(load_file(ours64), timm_at64, "timm at 64 px")
    print(f"PP=2 max |diff|: timm {timm_diff:.2e}, hf {hf_diff:.2e}, timm at 64 px {at64:.2e}")
