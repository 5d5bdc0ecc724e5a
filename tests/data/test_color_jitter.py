"""The DALI colour jitter (color_jitter.py) against numpy transcriptions of TF's kernels
(tf_color_ops.py): each op in float, the whole simclr_jitter_gray in uint8 with the pipeline's
own random draws, application rates, the random order. Real DALI pipelines on the CPU."""

import colorsys
import math

import numpy as np
import pytest
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (absent on the GPU box)")

from ov2_megatron.data import color_jitter
from ov2_megatron.data.color_jitter import JitterStrengths
from tests.data import tf_color_ops as tf

SIZE = 12  # test images are SIZE x SIZE


def sample_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 [SIZE, SIZE, 3]: uniformly random colours, plus in every image a row of grays,
    one of primaries, black, white and red == green ties, one of red == blue ties: the
    cases where the HSV formulas branch."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    images[:, 0] = rng.integers(0, 256, (count, SIZE, 1), dtype=np.uint8)  # gray: r = g = b
    images[:, 1, :6] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0],
                        [255, 255, 255]]
    images[:, 1, 6:, 1] = images[:, 1, 6:, 0]  # r == g ties
    images[:, 2, :, 2] = images[:, 2, :, 0]  # r == b ties
    return list(images)


def test_tf_transcriptions_agree_with_colorsys():
    """The reference itself, against Python's colorsys (float64 HSV): TF's kernels compute the
    same hue shift and saturation scaling, up to float32 rounding."""
    pixels = sample_images(4)[0].reshape(-1, 3)  # [144, 3]
    x = pixels.astype(np.float32)[None] / np.float32(255)  # [1, 144, 3]
    for delta, factor in ((0.08, 0.68), (-0.3, 1.32), (0.5, 2.0)):
        hue, sat = tf.adjust_hue(x, delta)[0], tf.adjust_saturation(x, factor)[0]
        for pixel, got_hue, got_sat in zip(x[0].astype(np.float64), hue, sat, strict=True):
            h, s, v = colorsys.rgb_to_hsv(*pixel)
            assert np.allclose(got_hue, colorsys.hsv_to_rgb((h + delta) % 1, s, v), atol=1e-6)
            assert np.allclose(got_sat, colorsys.hsv_to_rgb(h, min(s * factor, 1), v),
                               atol=1e-6)


def run_graph(graph, inputs: list[np.ndarray], seed: int = 7) -> list[np.ndarray]:
    """Build a CPU pipeline around `graph(images) -> outputs`, feed `inputs` (uint8 HWC) as
    one batch; [3, H, W] outputs come back as [H, W, 3]."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def pipe():
        images = fn.external_source(name="images", dtype=types.UINT8, layout="HWC")
        return tuple(graph(images))

    pipeline = pipe(batch_size=len(inputs), num_threads=1, device_id=None, seed=seed)
    pipeline.build()
    pipeline.feed_input("images", inputs)
    outputs = [np.stack([np.asarray(t) for t in out]) for out in pipeline.run()]
    return [out.transpose(0, 2, 3, 1) if out.ndim == 4 else out for out in outputs]


def unit_chw(images):
    """The ops' input: float32 [3, H, W] in [0, 1], as simclr_jitter_gray makes it."""
    from nvidia.dali import fn

    return fn.transpose(images, perm=[2, 0, 1]) / 255.0


def float_op(op):
    """graph: uint8 images -> (op(images / 255), per-sample factor)."""
    from nvidia.dali import fn

    def graph(images):
        factor = fn.random.uniform(range=[0.0, 2.0] if op is not color_jitter.hue
                                   else [-0.5, 0.5])
        return op(unit_chw(images), factor), factor
    return graph


@pytest.mark.parametrize("name", ["saturation", "hue"])
def test_hsv_ops_match_tf_kernels_in_float(name):
    """Closed forms vs TF's RGB -> HSV -> RGB round trips, with factors beyond the official
    ranges (saturation 0..2, hue +-0.5 turns, TF's limit)."""
    images = sample_images(48)
    out, factors = run_graph(float_op(getattr(color_jitter, name)), images)
    reference_op = tf.adjust_saturation if name == "saturation" else tf.adjust_hue
    worst = 0.0
    for image, got, factor in zip(images, out, factors, strict=True):
        x = image.astype(np.float32) / np.float32(255)
        worst = max(worst, float(np.abs(got - reference_op(x, float(factor))).max()))
    print(f"{name}: max |DALI - TF| = {worst:.2e} over {len(images) * SIZE * SIZE} pixels")
    assert worst < 2e-6  # float32 rounding only: 1/2000 of an 8-bit level


def test_brightness_contrast_grayscale_match_tf_formulas_in_float():
    from nvidia.dali import fn

    def graph(images):
        x = unit_chw(images)
        factor = fn.random.uniform(range=[0.5, 1.5])
        return x, x * factor, color_jitter.contrast(x, factor), color_jitter.grayscale(x), \
            factor

    images = sample_images(16)
    x, bright, contrast, gray, factors = run_graph(graph, images)
    for i, image in enumerate(images):
        ref = image.astype(np.float32) / np.float32(255)
        assert np.array_equal(x[i], ref)  # DALI's u8 / 255.0 is float32 division
        assert np.array_equal(bright[i], ref * factors[i])
        # The mean's summation order differs (TF halves pairwise): an ulp of the mean.
        assert np.abs(contrast[i] - tf.adjust_contrast(ref, factors[i])).max() < 1e-6
        assert np.abs(gray[i] - tf.rgb_to_grayscale(ref)).max() < 1e-6


def jitter_graph(strengths: JitterStrengths, jitter_probability: float,
                 grayscale_probability: float):
    """graph: uint8 images -> (simclr_jitter_gray output, the draws it used)."""
    def graph(images):
        draws = color_jitter.draw(strengths, jitter_probability, grayscale_probability)
        out = color_jitter.simclr_jitter_gray(images, strengths, draws)
        return (out, draws.jitter, draws.grayscale, draws.order, draws.brightness,
                draws.contrast, draws.saturation, draws.hue)
    return graph


def tf_reference(image, strengths, jitter, gray, order, factors, swap=None) -> np.ndarray:
    """The numpy TF composition with one sample's draws; `swap` exchanges two ops' slots."""
    ops = list(color_jitter.ORDERS[int(order)])
    if swap is not None:
        a, b = ops.index(swap[0]), ops.index(swap[1])
        ops[a], ops[b] = ops[b], ops[a]
    active = {op: float(f) for op, f in enumerate(factors)
              if (strengths.brightness, strengths.contrast, strengths.saturation,
                  strengths.hue)[op] > 0}
    return tf.simclr_jitter_gray(image, bool(jitter), ops, active, bool(gray))


def run_jitter(strengths, jitter_probability, grayscale_probability, count, seed=7):
    images = sample_images(count, seed)
    out, jitter, gray, order, *factors = run_graph(
        jitter_graph(strengths, jitter_probability, grayscale_probability), images, seed)
    # The op's float output holds uint8 values (floored, in [0, 255]).
    assert out.min() >= 0 and out.max() <= 255 and np.array_equal(out, np.floor(out))
    return images, out.astype(np.uint8), jitter, gray, order, np.stack(factors, axis=1)


def test_simclr_jitter_gray_matches_tf_in_uint8():
    """The official strength 0.4 (p 0.8 / 0.2), the pipeline's own draws."""
    strengths = JitterStrengths.simclr(0.4)
    images, out, jitter, gray, order, factors = run_jitter(strengths, 0.8, 0.2, 96)
    b, c, s, h = factors.T
    assert 0.68 <= b.min() and b.max() <= 1.32 and 0.68 <= c.min() and c.max() <= 1.32
    assert 0.68 <= s.min() and s.max() <= 1.32 and -0.08 <= h.min() and h.max() <= 0.08
    differ = total = 0
    for i, image in enumerate(images):
        reference = tf_reference(image, strengths, jitter[i], gray[i], order[i], factors[i])
        diff = np.abs(out[i].astype(int) - reference)
        assert diff.max() <= 1, i  # a float32 ulp can cross an integer before the truncation
        differ, total = differ + int((diff > 0).sum()), total + diff.size
        if not jitter[i] and not gray[i]:
            assert np.array_equal(out[i], image)  # x / 255 * 255 truncates back exactly
    print(f"pixels one level off TF's: {differ} of {total}")
    assert differ <= total * 1e-3


@pytest.mark.parametrize("op", ["brightness", "contrast"])
def test_single_op_configuration_equals_the_tf_formula(op):
    """Only one op at strength > 0 (TF skips zero-strength ops), always applied."""
    strengths = JitterStrengths(**{name: (0.32 if name == op else 0.0)
                                   for name in ("brightness", "contrast", "saturation", "hue")})
    images, out, jitter, gray, order, factors = run_jitter(strengths, 1.0, 0.0, 32)
    assert jitter.all() and not gray.any()
    column = 0 if op == "brightness" else 1
    for i, image in enumerate(images):
        x = image.astype(np.float32) / np.float32(255)
        y = x * factors[i, 0] if op == "brightness" else tf.adjust_contrast(x, factors[i, 1])
        reference = np.clip(np.clip(y, 0, 1) * np.float32(255), 0, 255).astype(np.uint8)
        if op == "brightness":  # the same float32 operations: bit-exact
            assert np.array_equal(out[i], reference), i
        else:
            assert np.abs(out[i].astype(int) - reference).max() <= 1, i
        assert abs(factors[i, column] - 1) <= 0.32
        assert not np.array_equal(out[i], image)


def binomial_tolerance(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma: fails by chance ~1 in 16,000 runs


def test_application_rates():
    """From the pixels: a gray image has r == g == b everywhere, an unjittered non-gray one
    equals its input; 0.2 and 0.8 * 0.2 of them."""
    n = 2000
    images, out, jitter, gray, _, _ = run_jitter(JitterStrengths.simclr(0.4), 0.8, 0.2, n)
    is_gray = np.array([(o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all()
                        for o in out])
    unchanged = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert np.array_equal(is_gray, gray.astype(bool))
    assert np.array_equal(unchanged, ~jitter.astype(bool) & ~gray.astype(bool))
    assert abs(is_gray.mean() - 0.2) < binomial_tolerance(0.2, n)
    assert abs(unchanged.mean() - 0.16) < binomial_tolerance(0.16, n)
    assert abs(jitter.mean() - 0.8) < binomial_tolerance(0.8, n)


def test_random_order_varies_and_matters():
    """Brightness and contrast only: every one of the 24 orders is drawn, and for some
    samples the other relative order of the two gives other pixels (TF clips after each op,
    so the two do not commute), while the drawn one matches TF's."""
    strengths = JitterStrengths(brightness=0.8, contrast=0.8, saturation=0.0, hue=0.0)
    images, out, jitter, gray, order, factors = run_jitter(strengths, 1.0, 0.0, 480)
    assert sorted(set(order.tolist())) == list(range(24))
    first = [color_jitter.ORDERS[o].index(0) < color_jitter.ORDERS[o].index(1) for o in order]
    assert abs(np.mean(first) - 0.5) < binomial_tolerance(0.5, len(order))
    order_matters = 0
    for i, image in enumerate(images):
        drawn = tf_reference(image, strengths, True, False, order[i], factors[i])
        swapped = tf_reference(image, strengths, True, False, order[i], factors[i],
                               swap=(0, 1))
        assert np.abs(out[i].astype(int) - drawn).max() <= 1, i
        order_matters += np.abs(drawn.astype(int) - swapped).max() > 1
    print(f"samples whose pixels depend on the brightness/contrast order: {order_matters} "
          f"of {len(images)}")
    assert order_matters > 0.5 * len(images)


def test_draws_are_seeded_and_identity_for_zero_strength():
    strengths = JitterStrengths(brightness=0.32, contrast=0.0, saturation=0.32, hue=0.0)
    first = run_jitter(strengths, 0.8, 0.2, 16, seed=3)
    again = run_jitter(strengths, 0.8, 0.2, 16, seed=3)
    other = run_jitter(strengths, 0.8, 0.2, 16, seed=4)
    for a, b in zip(first[1:], again[1:], strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[5], other[5])
    assert (first[5][:, 1] == 1).all() and (first[5][:, 3] == 0).all()  # contrast, hue off


@pytest.mark.gpu
def test_gpu_jitter_matches_cpu():
    """The same graph on GPU images: the draws stay on the CPU (same seeds, same values)."""
    pytest.importorskip("nvidia.dali", reason="GPU box without the DALI wheel")
    from nvidia.dali import fn, pipeline_def, types

    strengths = JitterStrengths.simclr(0.4)
    images = sample_images(64)

    def outputs(device_id):
        @pipeline_def(enable_conditionals=True)
        def pipe():
            x = fn.external_source(name="images", dtype=types.UINT8, layout="HWC")
            x = x.gpu() if device_id is not None else x
            draws = color_jitter.draw(strengths, 0.8, 0.2)
            return color_jitter.simclr_jitter_gray(x, strengths, draws), draws.order

        pipeline = pipe(batch_size=len(images), num_threads=1, device_id=device_id, seed=7)
        pipeline.build()
        pipeline.feed_input("images", images)
        out, order = pipeline.run()
        out = out.as_cpu() if device_id is not None else out
        return np.stack([np.asarray(t) for t in out]), np.stack([np.asarray(t) for t in order])

    cpu, cpu_order = outputs(None)
    gpu, gpu_order = outputs(0)
    assert np.array_equal(cpu_order, gpu_order)
    diff = np.abs(cpu.astype(int) - gpu)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
