"""One evaluation transform everywhere (ov2_megatron/data/preprocess.py): a non-square photo
preprocessed by each library's OWN pipeline, configured only by what the exports declare,
gives our pixels, and features equal to tools/extract_features.py --images.

    timm          resolve_data_config(model=...) + create_transform on the timm export
    hf            AutoImageProcessor of the default export (TimmWrapperImageProcessor: timm's
                  transform from config.json)
    hf-pil        AutoImageProcessor(backend="pil") of the --hf-class vit export
                  (preprocessor_config.json: ViTImageProcessor, squash only: export-hf
                  --hf-class vit refuses --resize shortest, since transformers crops at
                  floor((side - S) / 2)); transformers 5's default torchvision backend
                  resizes a little differently: its pixels are checked within one uint8 step
    open_clip     image_transform_v2(PreprocessCfg(**openclip_format.preprocess_cfg(...)))

Both resize modes, squash (the default, what the released checkpoints declare) and shortest.
Features are compared by max |difference| (fp32), within FEATURE_TOLERANCE.
"""

import json
import os

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from tests.conversion.conftest import run_tools, third_party

FEATURE_TOLERANCE = 1e-4  # max |ours - theirs| over patch tokens and pooled, fp32
PIXEL_TOLERANCE = 1e-6  # the same uint8 resize; only x / 255 and the normalisation round


def photo(path: str, width: int = 332, height: int = 211) -> str:
    """A natural-looking, non-square RGB image: gradients, a smooth pattern and noise.
    332 x 211 at the tiny model's 48 px is where the arithmetic choices show under 'shortest':
    the long side 48 * 332 / 211 = 75.5 truncates to 75 (rounding gives 76), and the crop
    offset (75 - 48) / 2 = 13.5 rounds to 14 (flooring gives 13)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = np.stack([255 * x / width, 255 * y / height,
                         128 + 60 * np.sin(x / 9.0) * np.cos(y / 13.0)], axis=-1)
    channels += rng.normal(0, 12, channels.shape)
    Image.fromarray(np.clip(channels, 0, 255).astype(np.uint8)).save(path)
    return path


def test_every_library_preprocesses_like_us(tp2_run, convert_python, tmp_path):
    from ov2_megatron.conversion import megatron_checkpoint, openclip_format
    from ov2_megatron.data.preprocess import RESIZE_MODES, from_run

    images = tmp_path / "images"
    images.mkdir()
    image = photo(str(images / "photo.png"))
    _, run = megatron_checkpoint.locate(tp2_run)
    vit_dir, jobs = str(tmp_path / "vit_squash"), []
    commands = [("convert_checkpoint", ["export-hf", "--checkpoint", tp2_run, "--output",
                                        vit_dir, "--hf-class", "vit"]),
                ("convert_checkpoint", ["export-hf", "--checkpoint", tp2_run, "--output",
                                        str(tmp_path / "vit_shortest"), "--hf-class", "vit",
                                        "--resize", "shortest"])]
    for resize in RESIZE_MODES:
        timm_dir, hf_dir = (str(tmp_path / f"{name}_{resize}") for name in ("timm", "hf"))
        flags = ["--checkpoint", tp2_run, "--resize", resize]
        commands += [
            ("convert_checkpoint", ["export-timm", *flags, "--output", timm_dir]),
            ("convert_checkpoint", ["export-hf", *flags, "--output", hf_dir]),
            ("extract_features", [*flags, "--images", str(images), "--no-progress",
                                  "--output", str(tmp_path / f"ours_{resize}.safetensors")])]
        with open(os.path.join(tmp_path, f"open_clip_{resize}.json"), "w") as f:
            json.dump(openclip_format.preprocess_cfg(from_run(run, resize=resize)), f)
        libraries = [("timm-image", timm_dir, "timm"), ("hf-image", hf_dir, "hf"),
                     ("openclip-image", timm_dir, "timm")]
        if resize == "squash":
            libraries += [("hf-pil-image", vit_dir, "vit"), ("hf-image", vit_dir, "vit")]
        jobs += [(library, model_dir, image, str(tmp_path / f"out_{library}_{name}_{resize}"))
                 for library, model_dir, name in libraries]
    results = run_tools(*commands, check=False)
    refused = results[1]
    assert refused[0] == 2 and "floor((side - S) / 2)" in refused[2], refused
    assert not os.path.exists(tmp_path / "vit_shortest")
    assert all(code == 0 for code, _, _ in results[:1] + results[2:]), results
    for resize in RESIZE_MODES:  # open_clip's transform is built from our preprocess_cfg
        os.replace(tmp_path / f"open_clip_{resize}.json",
                   tmp_path / f"timm_{resize}" / "open_clip_preprocess.json")
    results = third_party(convert_python, *jobs)
    report = []
    one_level = 1 / (255 * min(run.data.std)) + PIXEL_TOLERANCE  # one uint8 step, normalised
    for job, theirs in zip(jobs, results):
        resize = job[3].rsplit("_", 1)[1]
        with Image.open(image) as opened:
            our_pixels = from_run(run, resize=resize)(opened)[None]
        ours = load_file(str(tmp_path / f"ours_{resize}.safetensors"))
        what = f"{job[0]} ({theirs['info']['model_class']}), {resize}"
        pixel_diff = float(np.abs(theirs["pixels"] - our_pixels).max())
        feature_diff = max(float(np.abs(ours[name] - theirs[name]).max())
                           for name in ("patch_tokens", "pooled"))
        report.append(f"{what}: pixels {pixel_diff:.1e}, features {feature_diff:.1e}")
        if job[0] == "hf-image" and job[1] == vit_dir:  # the torchvision backend
            assert pixel_diff <= one_level, f"{what}: pixels differ by {pixel_diff:.2e}"
            continue
        assert pixel_diff <= PIXEL_TOLERANCE, f"{what}: pixels differ by {pixel_diff:.2e}"
        assert feature_diff <= FEATURE_TOLERANCE, f"{what}: features differ by " \
                                                  f"{feature_diff:.2e}"
    print("\n".join(report))


def test_transform_arithmetic_and_openclip_declarations():
    """torchvision's arithmetic without the libraries; what import-openclip says about a
    release's declared preprocessing; a bad mode is refused naming the choices."""
    import pytest

    from ov2_megatron.conversion.openclip_format import _preprocess_notes, preprocess_cfg
    from ov2_megatron.data.preprocess import EvalTransform

    shortest = EvalTransform(48, (0.5,) * 3, (0.25,) * 3, "shortest")
    assert shortest.resized_size(332, 211) == (75, 48)  # 75.5 truncated, as torchvision
    assert shortest.resized_size(211, 332) == (48, 75)
    assert EvalTransform(48, (0.5,) * 3, (0.25,) * 3).resized_size(332, 211) == (48, 48)
    assert preprocess_cfg(shortest) == dict(size=48, mode="RGB", mean=[0.5] * 3,
                                            std=[0.25] * 3, interpolation="bilinear",
                                            resize_mode="shortest", fill_color=0)
    released = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "interpolation": "bilinear", "resize_mode": "squash"}  # openvision-*.json
    assert _preprocess_notes(released) == []
    note, = _preprocess_notes({})  # open_clip's defaults: bicubic, shortest
    assert "'shortest'" in note and "--resize shortest" in note
    with pytest.raises(ValueError, match="squash, shortest"):
        EvalTransform(48, (0.5,) * 3, (0.25,) * 3, "crop")
