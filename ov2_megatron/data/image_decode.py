"""A PIL image -> the 8-bit RGB picture training sees, for every path that decodes with PIL.

Training decodes with DALI, which applies a JPEG's EXIF orientation, scales 16-bit images
from their full range and drops alpha (keeping the stored colours). PIL's
`image.convert("RGB")` does none of the first two: a phone photo tagged "rotate 90" stays
sideways, and a 16-bit greyscale PNG (modes I;16, I) is clipped at 255, i.e. solid white. So
the evaluation transform (tools/extract_features.py, tools/caption.py, the exports'
preprocessing: data/preprocess.py), prepare_shards' re-encode (data/sample_checks.py) and
`--resize` (data/resize_shards.py) all go through `to_rgb`.

The libraries that load our exports do not share one rule: transformers' `load_image`
(image_utils.py) calls `ImageOps.exif_transpose`; timm's and open_clip's transforms take the
PIL image the caller opened and apply no orientation. Users of those two should call
`PIL.ImageOps.exif_transpose` before preprocessing, as this module does.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

_INTEGER_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_FULL_16_BIT = 65535


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, 16-bit grey scaled to 8 bits, palette/alpha dropped, RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _INTEGER_GREY_MODES:
        # The PNG's bit depth is the range: 0..65535 -> 0..255 by v / 257, rounded (65535 / 255
        # = 257 exactly), as a decoder's 16 -> 8 bit conversion; PIL would clip at 255.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * 255.0 / _FULL_16_BIT), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey)  # uint8 [h, w] -> mode L
    if image.mode == "RGB":
        return image
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA":
        # dropping the transparency is the point (DALI decodes to RGB from the stored colours).
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


__all__ = ["to_rgb"]
