"""A PIL image -> the 8-bit RGB picture training sees, for every path that decodes with PIL.

Training decodes with DALI (fn.decoders.image and image_random_crop, CPU and nvJPEG: its
`adjust_orientation` defaults to True), which applies the EXIF orientation of a JPEG or PNG,
scales 16-bit images from their full range and drops alpha (keeping the stored colours).
PIL's `image.convert("RGB")` does none of the first two: a phone photo tagged "rotate 90"
stays sideways, and a 16-bit greyscale PNG (modes I;16, I) is clipped at 255, i.e. solid
white. So the evaluation transform (tools/extract_features.py, tools/caption.py, the exports'
preprocessing: data/preprocess.py), prepare_shards' re-encode (data/sample_checks.py),
`--resize` (data/resize_shards.py) and the PIL baseline of tools/bench_data.py all go through
`to_rgb`. 16-bit RGB PNGs are the one difference left: PIL keeps the high byte (v >> 8), DALI
rounds v / 257, at most 1 apart.

The libraries that load our exports do not share one rule (transformers 5.23, timm 1.0.31,
open_clip 3.3.0 as installed by `make convert-env`): transformers applies the orientation
where it opens the file itself (`image_utils.load_image`, the pipelines, an image processor
given a path or URL), but an image processor given a PIL image the caller opened uses its
pixels as stored, and so do timm's `create_transform` and open_clip's `preprocess`. Users of
those should call `PIL.ImageOps.exif_transpose(image)` before preprocessing, as this module
does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_INTEGER_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_FULL_16_BIT = 65535


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, 16-bit grey scaled to 8 bits, palette/alpha dropped, RGB."""
    image = ImageOps.exif_transpose(image)  # a new image, also when upright: ours to edit
    if image.mode in _INTEGER_GREY_MODES:
        # The PNG's bit depth is the range: 0..65535 -> 0..255 by v / 257, rounded (65535 / 255
        # = 257 exactly), as a decoder's 16 -> 8 bit conversion; PIL would clip at 255.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * 255.0 / _FULL_16_BIT), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey)  # uint8 [h, w] -> mode L
    # Dropping the transparency is the point (DALI decodes to RGB from the stored colours).
    # Removed here rather than by silencing convert's "Palette images with Transparency
    # expressed in bytes should be converted to RGBA" warning: warnings.catch_warnings changes
    # process-wide state, which is not safe in a threaded loader.
    image.info.pop("transparency", None)
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


__all__ = ["to_rgb"]
