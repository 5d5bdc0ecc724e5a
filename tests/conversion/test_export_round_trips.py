"""Distributed checkpoints written at TP=2 and PP=2 -> timm and Hugging Face folders, loaded
with the real packages (.venv-convert): the official features as each class exposes them
(patch tokens = raw output of the last block, pooled = LN(mean of the patch tokens)) equal
this framework's encode() within 1e-5 (fp32) on random images, and so does the penultimate
block (LLaVA's default layer) across the libraries.

TP=2: sin-cos positions, no registers -> timm, HF TimmWrapperModel, HF ViTModel (--hf-class vit).
PP=2: learned positions + 2 registers -> timm (reg_tokens), HF TimmWrapperModel, HF
Dinov2WithRegistersModel; timm also at another resolution (the learned table resized).
The native classes' own last_hidden_state and pooler_output are checked to be what
hf_format.py documents (LayerNorm on every token, LN(CLS)), and not the official features.
"""

import json
import os

import numpy as np
from safetensors.numpy import load_file

from tests.conversion.conftest import TOLERANCE, assert_features_close, run_tools, third_party

# Far above float noise: a LayerNorm with weights ~1 +- 0.2 moves O(1) features by O(1).
NOT_THE_SAME = 0.1


def _round_trip(run_dir, pixels, convert_python, tmp_path, native_class, more=(),
                third_party_jobs=()):
    timm_dir, hf_dir, vit_dir = (str(tmp_path / name) for name in ("timm", "hf", "hf_vit"))
    ours_file = str(tmp_path / "ours.safetensors")
    results = run_tools(
        ("convert_checkpoint", ["export-timm", "--checkpoint", run_dir, "--output", timm_dir]),
        ("convert_checkpoint", ["export-hf", "--checkpoint", run_dir, "--output", hf_dir]),
        ("convert_checkpoint", ["export-hf", "--checkpoint", run_dir, "--output", vit_dir,
                                "--hf-class", "vit"]),
        ("extract_features", ["--checkpoint", run_dir, "--pixels", pixels, "--output",
                              ours_file, "--batch-size", "3"]), *more)
    assert "4/4" in results[3][2]  # the progress bar counted every image
    assert "pooled = pooler_output" in results[1][1]
    assert "patch tokens = hidden_states[-1]" in results[2][1]
    ours = load_file(ours_file)
    size = np.load(pixels).shape[-1]
    assert ours["patch_tokens"].shape == (4, (size // 8) ** 2, 128)
    assert ours["pooled"].shape == (4, 128)
    assert sorted(os.listdir(timm_dir)) == sorted(os.listdir(hf_dir)) == ["config.json",
                                                                           "model.safetensors"]
    assert sorted(os.listdir(vit_dir)) == ["config.json", "model.safetensors",
                                           "preprocessor_config.json"]
    timm, hf, vit, *rest = third_party(
        convert_python, ("timm", timm_dir, pixels, str(tmp_path / "timm_out")),
        ("hf", hf_dir, pixels, str(tmp_path / "hf_out")),
        ("hf-vit", vit_dir, pixels, str(tmp_path / "hf_vit_out")), *third_party_jobs)
    assert timm["info"]["model_class"] == "VisionTransformer"
    assert (timm["info"]["norm"], timm["info"]["fc_norm"]) == ("Identity", "LayerNorm")
    assert hf["info"]["model_class"] == "TimmWrapperModel"
    assert vit["info"]["model_class"] == native_class
    prefix = timm["info"]["num_prefix_tokens"]
    assert hf["info"]["num_prefix_tokens"] == vit["info"]["num_prefix_tokens"] == prefix
    with open(os.path.join(run_dir, "config.json")) as f:
        run = json.load(f)
    for lib in (hf, vit):
        assert lib["info"]["image_mean"] == run["data"]["mean"], lib["info"]
        assert lib["info"]["image_std"] == run["data"]["std"], lib["info"]
    depth = run["model"]["vision"]["depth"]
    # TimmWrapper: one map per block; the native classes also the embedding output first.
    assert (hf["info"]["num_hidden_states"], vit["info"]["num_hidden_states"]) == (depth,
                                                                                   depth + 1)
    diffs = {name: assert_features_close(ours, lib, name)
             for name, lib in (("timm", timm), ("hf", hf), ("hf vit", vit))}
    assert hf["info"]["hidden_states_last_vs_tokens"] <= TOLERANCE
    for name, lib in (("hf", hf), ("hf vit", vit)):
        diffs[f"penultimate timm vs {name}"] = assert_features_close(
            timm, lib, f"penultimate block, timm vs {name}", names=("penultimate",))
    _check_native_outputs(vit, ours)
    return diffs, rest


def _check_native_outputs(vit: dict, ours: dict) -> None:
    """ViTModel / Dinov2WithRegistersModel outputs are what hf_format.py says, not ours."""
    assert vit["info"]["last_hidden_state_vs_layernorm_of_every_token"] <= TOLERANCE
    assert vit["info"]["pooler_output_vs_layernorm_of_cls"] <= TOLERANCE
    assert np.abs(vit["last_hidden_state"] - ours["patch_tokens"]).max() > NOT_THE_SAME
    assert np.abs(vit["pooler_output"] - ours["pooled"]).max() > NOT_THE_SAME


def _report(label: str, diffs: dict) -> None:
    print(f"{label} max |diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def test_tp2_checkpoint_to_timm_and_hf(tp2_run, pixels, convert_python, tmp_path):
    diffs, _ = _round_trip(tp2_run, pixels, convert_python, tmp_path, "ViTModel")
    _report("TP=2", diffs)


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
    diffs, (timm_at64,) = _round_trip(
        pp2_run, pixels, convert_python, tmp_path, "Dinov2WithRegistersModel", more,
        [("timm", timm64, pixels64, str(tmp_path / "timm64_out"))])
    assert timm_at64["info"]["num_prefix_tokens"] == 3
    with open(os.path.join(timm64, "config.json")) as f:
        assert json.load(f)["model_args"]["img_size"] == size
    diffs["timm at 64 px"] = assert_features_close(load_file(ours64), timm_at64, "timm at 64 px")
    _report("PP=2", diffs)
