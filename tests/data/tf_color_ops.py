"""numpy transcriptions of the TensorFlow ops behind the official `simclr_jitter_gray`, the
independent reference of the colour-jitter tests.

Each follows TF's CPU kernel for float32 images step by step (tensorflow/core/kernels/image/
adjust_contrast_op.cc `AdjustContrastOpv2`, adjust_saturation_op.cc, adjust_hue_op.cc,
image_ops_impl.py `rgb_to_grayscale`) and SimCLR's simclr_aug.py / big_vision's ops_image.py
for the composition, in float32 like TF; vectorised over pixels, branch for branch.
"""

from __future__ import annotations

import numpy as np

F = np.float32
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """[H, W, 3]: mean + factor * (x - mean); the mean is TF's halving pairwise sum times
    1 / (H * W)."""
    total = x.reshape(-1, 3).copy()
    remaining = len(total)
    while True:
        right = remaining // 2
        left = remaining - right
        total[:right] = total[left:left + right] + total[:right]
        remaining = left
        if remaining <= 1:
            break
    mean = total[0] * (F(1) / F(len(x.reshape(-1, 3))))
    return mean + F(factor) * (x - mean)


def _rgb_to_hsv(x: np.ndarray):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    vv = np.maximum(r, np.maximum(g, b))
    span = vv - np.minimum(r, np.minimum(g, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(vv > 0, span / vv, F(0))
        norm = F(1) / (F(6) * span)
        # `2.0 / 6.0` is a double in the kernel: the sum is rounded once, to float.
        hh = np.where(r == vv, norm * (g - b),
                      np.where(g == vv, (norm * (b - r)).astype(np.float64) + 2.0 / 6.0,
                               (norm * (r - g)).astype(np.float64) + 4.0 / 6.0)).astype(F)
    hh = np.where(span <= 0, F(0), hh)
    hh = np.where(hh < 0, hh + F(1), hh)
    return hh, s.astype(F), vv


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    c = s * v
    m = v - c
    dh = h * F(6)
    category = dh.astype(np.int32)
    fmodu = np.where(dh <= 0, dh + F(2), dh)
    fmodu = np.mod(fmodu, F(2))  # the kernel's `while (fmodu >= 2) fmodu -= 2`, exact here
    xx = c * (F(1) - np.abs(fmodu - F(1)))
    zero = np.zeros_like(c)
    pick = np.clip(category, 0, 6)  # 6 (h rounded up to 1) is the kernel's `default`: 0
    rr = np.choose(pick, [c, xx, zero, zero, xx, c, zero])
    gg = np.choose(pick, [xx, c, c, xx, zero, zero, zero])
    bb = np.choose(pick, [zero, zero, xx, c, c, xx, zero])
    return np.stack([rr + m, gg + m, bb + m], axis=-1)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    h, s, v = _rgb_to_hsv(x)
    s = np.minimum(F(1), np.maximum(F(0), s * F(factor)))
    return _hsv_to_rgb(h, s, v)


def _rgb_to_hv_range(x: np.ndarray):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    category = np.where(r < g, np.where(b < r, 1, np.where(b > g, 3, 2)),
                        np.where(b < g, 0, np.where(b > r, 4, 5)))
    v_max = np.choose(category, [r, g, g, b, b, r])
    v_mid = np.choose(category, [g, r, b, g, r, b])
    v_min = np.choose(category, [b, b, r, r, g, g])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (v_mid - v_min) / (v_max - v_min)
    increase = (category & 1) == 0
    h = np.where(increase, category + ratio, category + (F(1) - ratio)).astype(F)
    return np.where(v_max == v_min, F(0), h), v_min, v_max


def _hv_range_to_rgb(h, v_min, v_max) -> np.ndarray:
    category = h.astype(np.int32)
    ratio = h - category
    ratio = np.where((category & 1) == 0, ratio, F(1) - ratio)
    v_mid = v_min + ratio * (v_max - v_min)
    pick = np.clip(category, 0, 5)  # 5 is also the kernel's default
    r = np.choose(pick, [v_max, v_mid, v_min, v_min, v_mid, v_max])
    g = np.choose(pick, [v_mid, v_max, v_max, v_mid, v_min, v_min])
    b = np.choose(pick, [v_min, v_min, v_mid, v_max, v_max, v_mid])
    return np.stack([r, g, b], axis=-1)


def adjust_hue(x: np.ndarray, delta: float) -> np.ndarray:
    h, v_min, v_max = _rgb_to_hv_range(x)
    h = h + F(delta) * F(6)
    for _ in range(2):  # the kernel's while loops; |6 delta| <= 3 needs at most one step
        h = np.where(h < 0, h + F(6), h)
        h = np.where(h >= 6, h - F(6), h)
    return _hv_range_to_rgb(h.astype(F), v_min, v_max)


def rgb_to_grayscale(x: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [H, W, 3]: the dot product with (0.2989, 0.5870, 0.1140), tiled."""
    w = np.array([0.2989, 0.5870, 0.1140], dtype=F)
    gray = x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]
    return np.repeat(gray[..., None], 3, axis=-1)


def simclr_jitter_gray(image: np.ndarray, jitter: bool, order, factors: dict,
                       grayscale: bool) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8, with the random draws given (factors keyed by op id; an op
    missing from `factors` is skipped, as a zero strength in TF)."""
    x = image.astype(F) / F(255)
    if jitter:
        for op in order:
            if op in factors:
                x = _apply(op, x, factors[op])
            x = np.clip(x, F(0), F(1))
    if grayscale:
        x = rgb_to_grayscale(x)
    return np.clip(x * F(255), F(0), F(255)).astype(np.uint8)  # the cast truncates


def _apply(op: int, x: np.ndarray, factor: float) -> np.ndarray:
    if op == BRIGHTNESS:
        return x * F(factor)
    if op == CONTRAST:
        return adjust_contrast(x, factor)
    if op == SATURATION:
        return adjust_saturation(x, factor)
    return adjust_hue(x, factor)
