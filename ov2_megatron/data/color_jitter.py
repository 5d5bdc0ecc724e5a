"""SimCLR colour jitter + random grayscale as DALI ops: the official `simclr_jitter_gray`.

OpenVision 2 (UCSC-VLAA/OpenVision, src/transforms/ops_image.py `random_color_jitter` and
simclr_aug.py, `simclr_jitter_gray(jitter_strength=0.4)`) does, per uint8 image after the crop:
    x = image / 255
    with probability 0.8, color_jitter(strength s, random_order=True, impl="simclrv2"): the four
    ops below in a uniformly random order (tf.random_shuffle), x = clip(x, 0, 1) after each:
        brightness  x * b                            b ~ U[max(1 - 0.8 s, 0), 1 + 0.8 s]
        contrast    (x - mean_c) * c + mean_c        c ~ U[1 - 0.8 s, 1 + 0.8 s]; mean_c is the
                                                     image mean of channel c (adjust_contrast)
        saturation  HSV S -> min(S * f, 1)           f ~ U[1 - 0.8 s, 1 + 0.8 s]
        hue         HSV H -> H + d (mod 1)           d ~ U[-0.2 s, 0.2 s]
    with probability 0.2, x = rgb_to_grayscale(x) (0.2989 R + 0.5870 G + 0.1140 B) in all 3
    channels; then image = uint8(clip(x * 255, 0, 255)), a cast that truncates.

Here, in one graph for CPU and GPU (the ops run wherever the images are; "mixed" decoding
puts them on the GPU):
  * every random number comes from a DALI random op (coin_flip, uniform, choice over the 24
    orders), drawn for every sample whether it is used or not: the streams are seeded by the
    pipeline seed, restored by DALI checkpoints, and independent of the branches taken;
  * each sample runs exactly the ops it drew, through DALI conditionals (`if` on per-sample
    predicates; the pipeline is built with enable_conditionals=True): slot i of 4 runs the op
    at position i of the sample's order. Without branches every slot would compute all four
    ops and select one (4x the arithmetic, the hue op alone is ~40 elementwise ops), and a
    sample that draws no jitter would pay for it too;
  * brightness, contrast and grayscale are TF's float32 formulas (only the summation order of
    the mean and of the gray dot product can differ, by an ulp); saturation and hue are closed
    forms of TF's RGB -> HSV -> RGB kernels (adjust_saturation_op.cc, adjust_hue_op.cc), equal
    in exact arithmetic. Against a numpy transcription of those kernels (tests/data/
    tf_color_ops.py) on 400 random 32 x 32 images at the official ranges: float32 differences
    of at most 5e-7 (saturation) and 9e-7 (hue), under 1/4000 of an 8-bit level; the whole
    jitter at strength 0.4 left 6 of 1.2M uint8 pixels one level off (a float ulp on the other
    side of an integer before the truncation), none more. DALI's own fn.saturation / fn.hue
    work in YIQ instead: 9.4 / 10.2 levels off on average, 68 / 106 at most, on the same
    images; hence the arithmetic here;
  * the result is floored, as TF's truncating cast (DALI's cast rounds), and stays float32
    CHW for crop_mirror_normalize.
Cost: DALI runs each elementwise op as its own pass over memory (no fusion): ~70 ops, about
45 full-image passes, for a jittered image, half of it in the hue op. On 2 CPU cores the
training loader at 224 px ran at 0.35-0.42x the images/s it has without colour ops, 0.57x at
84 px (tools/bench_data.py, 500 x 375 JPEGs). On the GPU the same ops are batched elementwise
kernels (not measured yet).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
ORDERS = tuple(itertools.permutations(range(4)))  # the 24 orders tf.random_shuffle can give
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
# A grey pixel (max == min) has chroma 0; dividing by this instead leaves it unchanged (the
# numerators are 0 too), as TF's kernels special-case it.
_TINY = 1e-30
# The hue (in sixths of the circle) opposite each of R, G, B, where that channel is the
# minimum: cyan, magenta, yellow (see `hue`).
_CHANNEL_OPPOSITE = (3.0, 5.0, 1.0)


@dataclass(frozen=True)
class JitterStrengths:
    """Maximum change of each op (0 skips it, as TF's color_jitter_rand does)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float

    @classmethod
    def simclr(cls, strength: float) -> "JitterStrengths":
        """color_jitter(strength): 0.8 s for brightness, contrast, saturation; 0.2 s for hue."""
        return cls(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)


@dataclass
class JitterDraws:
    """Per-sample random parameters (DALI DataNodes, one scalar per sample, on the CPU)."""

    jitter: object
    """bool: the colour jitter applies (probability `jitter_probability`)."""
    grayscale: object
    """bool: the image becomes gray afterwards (probability `grayscale_probability`)."""
    brightness: object
    """float: the brightness factor b."""
    contrast: object
    """float: the contrast factor c."""
    saturation: object
    """float: the saturation factor f."""
    hue: object
    """float: the hue shift d, in turns of the hue circle."""
    order: object
    """int: index into ORDERS of the sample's op order."""
    slot_ops: list
    """int per slot 0..3: the op (BRIGHTNESS...HUE) that runs in that slot, ORDERS[order][i]."""


def draw(strengths: JitterStrengths, jitter_probability: float,
         grayscale_probability: float) -> JitterDraws:
    """All random parameters, TF's ranges. A zero-strength op draws its identity factor."""
    def uniform(low: float, high: float):
        return fn.random.uniform(range=[low, high]) if high > low else fn.constant(
            fdata=low, shape=[], dtype=types.FLOAT)

    b, c, s, h = (strengths.brightness, strengths.contrast, strengths.saturation,
                  strengths.hue)
    order = fn.random.choice(len(ORDERS))
    keys = list(range(len(ORDERS)))
    return JitterDraws(
        jitter=fn.random.coin_flip(probability=jitter_probability, dtype=types.BOOL),
        grayscale=fn.random.coin_flip(probability=grayscale_probability, dtype=types.BOOL),
        brightness=uniform(max(1.0 - b, 0.0), 1.0 + b), contrast=uniform(1.0 - c, 1.0 + c),
        saturation=uniform(1.0 - s, 1.0 + s), hue=uniform(-h, h), order=order,
        slot_ops=[fn.lookup_table(order, keys=keys, values=[o[i] for o in ORDERS],
                                  dtype=types.INT32) for i in range(4)])


def simclr_jitter_gray(images, strengths: JitterStrengths, draws: JitterDraws):
    """uint8 [H, W, 3] HWC images (CPU or GPU) -> float32 [3, H, W] CHW holding the uint8
    values of the official op (module docstring), ready for crop_mirror_normalize. Needs a
    pipeline built with enable_conditionals=True.

    Planar CHW, because the per-pixel HSV ops need the channels apart: a CHW channel slice is
    one contiguous copy and a channel max/min two elementwise ops on planes, where HWC needs
    strided slices and a reduction over the innermost axis (the HWC version of this graph
    gave the loader 0.55x the images/s on the CPU). The output stays float: the values are
    integers already, and DALI's CPU cast to uint8 costs more than the rest of this frame."""
    x = fn.transpose(images, perm=[2, 0, 1]) / 255.0  # float32 [3, H, W] in [0, 1]
    if draws.jitter:
        for slot in range(4):
            x = _jitter_slot(x, draws.slot_ops[slot], strengths, draws)
    if draws.grayscale:
        x = grayscale(x)
    # TF: uint8(clip(x * 255, 0, 255)), a truncating cast. x is in [0, 1] here (clipped after
    # every slot; the gray weights sum to 0.9999), so only the truncation is left to do.
    return dmath.floor(x * 255.0)


def _jitter_slot(x, op, strengths: JitterStrengths, draws: JitterDraws):
    """One position of the random order: the op drawn for it (identity at strength 0, as
    TF's `brightness_foo` etc.), then TF's clip."""
    if op == BRIGHTNESS:
        x = x * draws.brightness if strengths.brightness else x
    elif op == CONTRAST:
        x = contrast(x, draws.contrast) if strengths.contrast else x
    elif op == SATURATION:
        x = saturation(x, draws.saturation) if strengths.saturation else x
    else:
        x = hue(x, draws.hue) if strengths.hue else x
    return _clip_unit(x)


def _clip_unit(x):
    """clip(x, 0, 1) as two elementwise ops: DALI's CPU clamp is several times slower."""
    return dmath.min(dmath.max(x, 0.0), 1.0)


def _planes(x):
    return x[0:1], x[1:2], x[2:3]  # red, green, blue: [1, H, W] each


def contrast(x, factor):
    """tf.image.adjust_contrast: each channel scaled by `factor` about its own image mean."""
    mean = fn.reductions.mean(x, axis_names="HW", keep_dims=True)  # [3, 1, 1]
    return (x - mean) * factor + mean


def _value_and_chroma(red, green, blue):
    value = dmath.max(red, dmath.max(green, blue))  # [1, H, W] HSV V
    return value, value - dmath.min(red, dmath.min(green, blue))  # V * S


def saturation(x, factor):
    """tf.image.adjust_saturation in closed form. H and V stay; S = chroma / V becomes
    min(S * factor, 1), and every channel keeps its relative place between V and the minimum,
    so c' = V - (V - c) * min(factor, V / chroma)."""
    value, chroma = _value_and_chroma(*_planes(x))
    scale = dmath.min(factor, value / dmath.max(chroma, _TINY))  # [1, H, W]
    return value - (value - x) * scale


def hue(x, delta):
    """tf.image.adjust_hue in closed form. V and chroma stay; the hue angle H, in sixths of
    the circle, moves by 6 * delta. An HSV colour has channel c = V - chroma * w_c(H) with
    w_c(H) = clamp(2 - dist(H, o_c), 0, 1), dist the distance on the circle of 6 and o_c the
    angle opposite channel c (R 3, G 5, B 1): the channel is V within one sixth of its own
    hue, the minimum within one sixth of the opposite one, linear in between."""
    red, green, blue = _planes(x)
    value, chroma = _value_and_chroma(red, green, blue)
    inverse = 1.0 / dmath.max(chroma, _TINY)  # [1, H, W]
    # H from whichever channel is the maximum; red wins ties, then green, as in TF (a tie
    # gives the same angle from either formula).
    angle = (red - green) * inverse + 4.0  # blue is the maximum
    angle = angle + (green >= value) * ((blue - red) * inverse + 2.0 - angle)
    angle = angle + (red >= value) * ((green - blue) * inverse - angle)
    angle = angle + delta * 6.0
    angle = angle - 6.0 * dmath.floor(angle * (1.0 / 6.0))  # into [0, 6)
    opposite = fn.constant(fdata=list(_CHANNEL_OPPOSITE), shape=[3, 1, 1], dtype=types.FLOAT)
    distance = dmath.abs(angle - opposite)  # [3, H, W]; dist(H, o) = 3 - |distance - 3|
    weight = dmath.min(dmath.max(dmath.abs(distance - 3.0) - 1.0, 0.0), 1.0)
    return value - chroma * weight


def grayscale(x):
    """tf.image.rgb_to_grayscale, tiled to 3 channels: each the same dot product of the
    pixel with GRAY_WEIGHTS (summed left to right; TF's matmul may order it otherwise)."""
    red, green, blue = _planes(x)
    gray = red * GRAY_WEIGHTS[0] + green * GRAY_WEIGHTS[1] + blue * GRAY_WEIGHTS[2]
    return fn.cat(gray, gray, gray, axis=0)  # [3, H, W]


__all__ = ["JitterStrengths", "JitterDraws", "draw", "simclr_jitter_gray", "contrast",
           "saturation", "hue", "grayscale", "ORDERS", "GRAY_WEIGHTS",
           "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"]
