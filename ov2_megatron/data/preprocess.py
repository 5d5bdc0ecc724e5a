"""The one evaluation transform: a PIL image -> normalised [3, S, S] float32, as feature
extraction, captioning and every export's image-processor config apply it.

Two resize modes:
    squash    (default) bilinear resize of the whole image to S x S, aspect ratio not kept:
              what the released OpenVision checkpoints declare in their OpenCLIP
              `preprocess_cfg` (official src/convert_upload/open_clip/model_configs/
              openvision-*.json: "interpolation": "bilinear", "resize_mode": "squash",
              ImageNet mean/std), so features match what users of those releases get.
    shortest  bilinear resize of the shorter side to S, then the centre S x S crop: the
              official big_vision evaluation (`resize_small(S, method="bilinear",
              antialias=True)|central_crop(S)`), which keeps the aspect ratio.

The arithmetic is torchvision's, which timm and open_clip run and transformers' ViT / CLIP
processors reproduce: PIL's antialiased resize on the uint8 image; for `shortest` the long
side is int(S * long / short) (truncated, not rounded) and the crop offset
int(round((side - S) / 2)); then x / 255, (x - mean) / std in float32. Exports derive their
configs from this class (conversion/timm_format.py, hf_format.py, openclip_format.py), so the
libraries' own pipelines give these pixels (tests/conversion/test_preprocess_parity.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESIZE_MODES = ("squash", "shortest")


@dataclass(frozen=True)
class EvalTransform:
    size: int
    """Output side S in pixels (the model's vision.image_size, or the export resolution)."""

    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling to [0, 1] (the run's data.mean)."""

    std: tuple[float, float, float]
    """Per-channel standard deviation divided out (the run's data.std)."""

    resize: str = "squash"
    """'squash' (the released checkpoints' declaration) or 'shortest' (+ centre crop)."""

    interpolation: str = "bilinear"
    """PIL filter name; bilinear is what both the official eval and the releases use."""

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r}: use one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation {self.interpolation!r}: use bilinear or bicubic")
        if self.size < 1:
            raise ValueError(f"size {self.size} must be >= 1")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, before any crop."""
        if self.resize == "squash":
            return self.size, self.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)  # torchvision truncates
        return (self.size, new_long) if width <= height else (new_long, self.size)

    def __call__(self, image) -> np.ndarray:
        """PIL image -> [3, S, S] float32, normalised."""
        from PIL import Image

        from ov2_megatron.data.image_decode import to_rgb

        image = to_rgb(image)  # upright, 16-bit scaled: the picture training decodes
        resample = Image.BILINEAR if self.interpolation == "bilinear" else Image.BICUBIC
        image = image.resize(self.resized_size(*image.size), resample)
        if self.resize == "shortest":
            left = int(round((image.width - self.size) / 2.0))
            top = int(round((image.height - self.size) / 2.0))
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [3, S, S]

    def to_dict(self) -> dict:
        return dict(asdict(self), mean=list(self.mean), std=list(self.std))


def from_run(run, size: int | None = None, resize: str = "squash") -> EvalTransform:
    """The transform of a RunConfig's model and data settings, at `size` (default: the
    model's vision.image_size)."""
    return EvalTransform(size=size or run.model.vision.image_size, mean=tuple(run.data.mean),
                         std=tuple(run.data.std), resize=resize)
