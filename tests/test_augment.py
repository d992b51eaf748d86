"""Tests for rr_jax.augment against NumPy, PIL and colorsys references and statistics."""

import colorsys
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy import stats

from rr_jax import augment

# No augmentation at all: the identity crop of a square image, every op switched off.
IDENTITY = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_prob=0.0,
    jitter_prob=0.0,
    grayscale_prob=0.0,
)
P_MIN = 1e-3  # significance level of the statistical tests


pytestmark = pytest.mark.usefixtures("fast_compile")


def keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def random_uint8(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def random_pixels(seed, shape):
    """Random float32 colours, with some gray pixels and ties between channels."""
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    if shape[-1] == 3:
        x[0, 0] = x[0, 0, :1]  # gray
        x[0, 1, 1] = x[0, 1, 0]  # red == green
        x[0, 2, 2] = x[0, 2, 1]  # green == blue
    return x


# --------------------------------------------------------------- NumPy references


def np_luma(x):
    if x.shape[-1] == 1:
        return x
    return 0.299 * x[..., :1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:]


def np_hue(x, shift):
    """Hue rotation pixel by pixel with colorsys."""
    if x.shape[-1] == 1:
        return x
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[index].astype(np.float64))
        out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def np_color_op(x, op, factor):
    """torchvision's ColorJitter ops: blend with 0 / mean luma / luma, or hue, then clamp."""
    if op == augment.HUE:
        return np.clip(np_hue(x, factor), 0, 1)
    reference = {
        augment.BRIGHTNESS: 0.0,
        augment.CONTRAST: np_luma(x).mean(),
        augment.SATURATION: np_luma(x),
    }[op]
    return np.clip(factor * x + (1 - factor) * reference, 0, 1)


def np_crop_box(rng, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, written with NumPy."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------ augment_views


def test_views_shape_dtype_range_and_determinism():
    images = random_uint8(0, (3, 12, 10, 3))
    images[2] = images[0]  # the same image gets different views at the same view index
    config = augment.AugmentConfig(out_size=(8, 6), mean=(0.5, 0.4, 0.3), std=(0.25,))
    augment_views = jax.jit(lambda key: augment.augment_views(key, images, 4, config))
    views = augment_views(jax.random.key(0))
    assert views.shape == (4, 3, 8, 6, 3) and views.dtype == jnp.float32
    views = np.asarray(views)
    pixels = views * 0.25 + np.array([0.5, 0.4, 0.3])
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6

    np.testing.assert_array_equal(augment_views(jax.random.key(0)), views)  # same key
    assert np.abs(np.asarray(augment_views(jax.random.key(1))) - views).max() > 0.1
    # Every (view, image) pair has its own randomness.
    for (a, i), (b, j) in itertools.combinations(itertools.product(range(4), (0, 2)), 2):
        assert np.abs(views[a, i] - views[b, j]).max() > 1e-3


@pytest.mark.parametrize("shape, ratio", [((9, 9, 3), 1.0), ((6, 10, 1), 10 / 6)])
def test_identity_config_returns_the_normalised_input(shape, ratio):
    images = random_uint8(1, (2,) + shape)
    mean, std = (0.2, 0.5, 0.7)[: shape[-1]], (0.3, 0.2, 0.1)[: shape[-1]]
    config = augment.AugmentConfig(
        **{**IDENTITY, "crop_ratio": (ratio, ratio)}, mean=mean, std=std
    )
    views = augment.augment_views(jax.random.key(2), images, 3, config)
    expected = (images.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    # Equal up to float32 rounding (XLA divides by 255 as a multiplication by 1/255).
    np.testing.assert_allclose(views, np.broadcast_to(expected, views.shape), rtol=1e-6, atol=1e-6)


def test_flip_rate_is_one_half():
    images = random_uint8(3, (40, 6, 6, 3))
    config = augment.AugmentConfig(**{**IDENTITY, "flip_prob": 0.5})
    views = np.asarray(augment.augment_views(jax.random.key(4), images, 50, config))
    originals = images.astype(np.float32) / 255
    same = np.all(np.isclose(views, originals, atol=1e-6), axis=(2, 3, 4))
    mirrored = np.all(np.isclose(views, originals[:, :, ::-1], atol=1e-6), axis=(2, 3, 4))
    assert np.all(same ^ mirrored)  # every view is the image or its exact mirror
    assert stats.binomtest(int(mirrored.sum()), mirrored.size, 0.5).pvalue > P_MIN


def test_one_channel_views():
    images = random_uint8(5, (2, 8, 8, 1))
    views = np.asarray(augment.augment_views(jax.random.key(6), images, 3))
    assert views.shape == (3, 2, 8, 8, 1)
    assert 0 <= views.min() and views.max() <= 1 and views.std() > 0.05


@pytest.mark.parametrize(
    "images, num_views, config, message",
    [
        (np.zeros((2, 8, 8, 3), np.float32), 2, None, "uint8"),
        (np.zeros((8, 8, 3), np.uint8), 2, None, "uint8"),
        (np.zeros((2, 8, 8, 2), np.uint8), 2, None, "C in"),
        (np.zeros((2, 8, 8, 3), np.uint8), 0, None, "num_views"),
        (np.zeros((2, 8, 8, 3), np.uint8), 2, {"mean": (0.1, 0.2)}, "mean"),
        (np.zeros((2, 8, 8, 1), np.uint8), 2, {"std": (0.1, 0.2, 0.3)}, "std"),
    ],
)
def test_augment_views_rejects_bad_input(images, num_views, config, message):
    config = None if config is None else augment.AugmentConfig(**config)
    with pytest.raises(ValueError, match=message):
        augment.augment_views(jax.random.key(0), images, num_views, config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("flip_prob", 1.5),
        ("jitter_prob", -0.1),
        ("grayscale_prob", 2.0),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.5, 1.2)),
        ("crop_ratio", (2.0, 1.0)),
        ("brightness", -0.1),
        ("hue", 0.6),
        ("std", (1.0, 0.0, 1.0)),
        ("mean", ()),
        ("out_size", (0, 4)),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        augment.AugmentConfig(**{field: value})


def test_config_is_hashable_and_normalises_sequences():
    config = augment.AugmentConfig(out_size=16, mean=[0.5], crop_scale=[0.2, 1], flip_prob=1)
    same = augment.AugmentConfig(
        out_size=(16, 16), mean=(0.5,), crop_scale=(0.2, 1.0), flip_prob=1.0
    )
    assert config == same and hash(config) == hash(same)
    assert isinstance(config.flip_prob, float)


# ----------------------------------------------------------------------- cropping


@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [(32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (24, 40, (0.08, 1.0), (0.2, 5.0))],
)
def test_crop_boxes_follow_torchvision(height, width, scale, ratio):
    n = 10_000
    sample = jax.jit(
        jax.vmap(
            functools.partial(
                augment.sample_crop_box, height=height, width=width, scale=scale, ratio=ratio
            )
        )
    )
    top, left, h, w = np.asarray(sample(keys(7, n))).T
    assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= height) & (left + w <= width))

    rng = np.random.default_rng(8)
    ref_top, ref_left, ref_h, ref_w = np.array(
        [np_crop_box(rng, height, width, scale, ratio) for _ in range(n)]
    ).T
    for ours, reference in [
        (h * w / (height * width), ref_h * ref_w / (height * width)),  # area fraction
        (np.log(w / h), np.log(ref_w / ref_h)),  # aspect ratio
        (top / (height - h + 1), ref_top / (height - ref_h + 1)),  # offsets
        (left / (width - w + 1), ref_left / (width - ref_w + 1)),
    ]:
        assert stats.ks_2samp(ours, reference).pvalue > P_MIN


def test_crop_box_distribution_test_has_power():
    """The KS test above rejects a uniform (not log-uniform) aspect ratio."""
    rng = np.random.default_rng(9)
    log_uniform = [np_crop_box(rng, 24, 40, (0.08, 1.0), (0.2, 5.0)) for _ in range(10_000)]
    ratios = rng.uniform(0.2, 5.0, 10_000)
    areas = 960 * rng.uniform(0.08, 1.0, 10_000)
    w, h = np.round(np.sqrt(areas * ratios)), np.round(np.sqrt(areas / ratios))
    valid = (w > 0) & (w <= 40) & (h > 0) & (h <= 24)
    _, _, ref_h, ref_w = np.array(log_uniform).T
    assert stats.ks_2samp(np.log(w[valid] / h[valid]), np.log(ref_w / ref_h)).pvalue < 1e-6


@pytest.mark.parametrize(
    "height, width, ratio, box",
    [
        (8, 32, (1.0, 1.0), (0, 12, 8, 8)),  # too wide: clamp the ratio to its maximum
        (32, 8, (1.0, 1.0), (12, 0, 8, 8)),  # too tall: clamp the ratio to its minimum
        (8, 32, (4.5, 5.0), (0, 0, 7, 32)),  # round(32 / 4.5) = 7 rows, central
    ],
)
def test_crop_box_fallback_is_the_central_crop(height, width, ratio, box):
    # scale (0.9, 1) makes every square-ish attempt larger than the short side.
    sample = functools.partial(
        augment.sample_crop_box, height=height, width=width, scale=(0.9, 1.0), ratio=ratio
    )
    got = jax.jit(sample)(jax.random.key(10))
    np.testing.assert_array_equal(got, box)


@pytest.mark.parametrize(
    "box, out_size",
    [
        ((2, 3, 5, 4), (9, 7)),  # upscaling
        ((0, 0, 10, 12), (4, 5)),  # downscaling the whole image (antialiased)
        ((1, 2, 8, 6), (3, 8)),  # shrinking one axis, stretching the other
        ((3, 1, 1, 1), (2, 2)),  # a single pixel
    ],
)
def test_resized_crop_matches_pil_bilinear(box, out_size):
    """torchvision on PIL images crops, then resizes bilinearly (antialiased when shrinking)."""
    image = np.random.default_rng(11).random((10, 12, 3), dtype=np.float32)
    got = jax.jit(augment.resized_crop, static_argnums=2)(image, jnp.asarray(box), out_size)
    top, left, h, w = box
    expected = np.stack(
        [
            np.asarray(
                Image.fromarray(image[..., c], mode="F")
                .crop((left, top, left + w, top + h))
                .resize(out_size[::-1], Image.BILINEAR)
            )
            for c in range(3)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(got, expected, atol=2e-6)


# ------------------------------------------------------------------------- colour


@pytest.mark.parametrize("shift", [0.0, 0.13, -0.2, 0.5, -0.45])
def test_adjust_hue_matches_colorsys(shift):
    image = random_pixels(12, (6, 8, 3))
    got = jax.jit(augment.adjust_hue)(image, shift)
    np.testing.assert_allclose(got, np_hue(image, shift), atol=2e-6)


@pytest.mark.parametrize("factor", [0.0, 0.4, 1.0, 1.7])
def test_brightness_contrast_saturation_closed_forms(factor):
    image = random_pixels(13, (5, 7, 3))
    for op in (augment.BRIGHTNESS, augment.CONTRAST, augment.SATURATION):
        np.testing.assert_allclose(
            jax.jit(augment.adjust_color)(image, op, factor), np_color_op(image, op, factor), atol=2e-6
        )


@pytest.mark.parametrize("factor", [0.3, 0.8])
def test_saturation_keeps_hsv_hue_and_scales_chroma(factor):
    """Checked with colorsys: blending with the luma keeps the hue, scales max - min."""
    image = random_pixels(14, (4, 6, 3))[1:]  # no gray pixels: their hue is undefined
    got = np.asarray(jax.jit(augment.adjust_color)(image, augment.SATURATION, factor), np.float64)
    for index in np.ndindex(image.shape[:-1]):
        h0, s0, v0 = colorsys.rgb_to_hsv(*image[index].astype(np.float64))
        h1, s1, v1 = colorsys.rgb_to_hsv(*got[index])
        assert abs((h1 - h0 + 0.5) % 1.0 - 0.5) < 1e-5
        assert s1 * v1 == pytest.approx(factor * s0 * v0, abs=1e-6)


def test_grayscale_is_itu_601_luma():
    image = random_pixels(15, (4, 5, 3))
    gray = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    np.testing.assert_allclose(
        jax.jit(augment.to_grayscale)(image), np.repeat(gray[..., None], 3, -1), atol=1e-6
    )


def test_one_channel_colour_ops():
    image = random_pixels(16, (5, 6, 1))
    for same in [
        jax.jit(augment.adjust_color)(image, augment.SATURATION, 0.3),
        augment.adjust_hue(image, 0.2),
        augment.to_grayscale(image),
    ]:
        np.testing.assert_array_equal(same, image)
    np.testing.assert_allclose(
        jax.jit(augment.adjust_color)(image, augment.CONTRAST, 0.5),
        0.5 * image + 0.5 * np.mean(image),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jax.jit(augment.adjust_color)(image, augment.BRIGHTNESS, 1.5), np.clip(1.5 * image, 0, 1), atol=1e-6
    )


def test_jitter_order_matters_and_is_followed():
    image = random_pixels(17, (4, 6, 3))
    factors = jnp.asarray([1.7, 0.3, 1.0, 0.0])  # brightness clamps, then contrast
    outputs = []
    for order in ([0, 1, 2, 3], [1, 0, 2, 3]):
        got = jax.jit(augment.apply_color_jitter)(image, jnp.asarray(order), factors)
        expected = image
        for op in order:
            expected = np_color_op(expected, op, float(factors[op]))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        outputs.append(np.asarray(got))
    assert np.abs(outputs[0] - outputs[1]).max() > 0.05


@pytest.mark.parametrize("channels", [3, 1])
def test_random_jitter_applies_sampled_ops_in_sampled_order(channels):
    """On one channel the reference skips saturation and hue (gray images have neither)."""
    image = random_pixels(18, (3, 4, channels))
    strengths = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    sample = jax.jit(jax.vmap(functools.partial(augment.sample_color_jitter, **strengths)))
    orders, factors = sample(keys(19, 24))
    got = jax.jit(jax.vmap(augment.apply_color_jitter, in_axes=(None, 0, 0)))(
        jnp.asarray(image), orders, factors
    )
    for order, factor, out in zip(np.asarray(orders), np.asarray(factors), np.asarray(got)):
        expected = image
        for op in order:
            expected = np_color_op(expected, op, factor[op])
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_jitter_orders_and_factors_are_uniform():
    n = 24 * 200
    sample = jax.jit(
        jax.vmap(
            functools.partial(
                augment.sample_color_jitter, brightness=0.8, contrast=0.5, saturation=1.2, hue=0.2
            )
        )
    )
    orders, factors = map(np.asarray, sample(keys(20, n)))
    permutations = list(itertools.permutations(range(4)))
    counts = np.array([np.all(orders == p, axis=1).sum() for p in permutations])
    assert counts.sum() == n  # every order is a permutation
    assert stats.chisquare(counts).pvalue > P_MIN
    for column, (low, high) in enumerate([(0.2, 1.8), (0.5, 1.5), (0.0, 2.2), (-0.2, 0.2)]):
        assert stats.kstest(factors[:, column], stats.uniform(low, high - low).cdf).pvalue > P_MIN


@pytest.mark.parametrize(
    "random_op, prob",
    [
        (functools.partial(augment.random_grayscale, prob=0.2), 0.2),
        (
            functools.partial(
                augment.random_color_jitter,
                prob=0.8,
                brightness=0.8,
                contrast=0.8,
                saturation=0.8,
                hue=0.2,
            ),
            0.8,
        ),
    ],
)
def test_random_application_rate(random_op, prob):
    n = 3000
    image = jnp.asarray(random_pixels(21, (3, 3, 3)))
    out = jax.jit(jax.vmap(random_op, in_axes=(0, None)))(keys(22, n), image)
    changed = np.abs(np.asarray(out) - np.asarray(image)).max(axis=(1, 2, 3)) > 1e-4
    assert stats.binomtest(int(changed.sum()), n, prob).pvalue > P_MIN


# -------------------------------------------------------- fine-tuning and probes


def test_normalize_images_is_unit_pixels_minus_mean_over_std():
    images = random_uint8(30, (2, 3, 4, 3))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    got = augment.normalize_images(images, mean=mean, std=std)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, (images / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)


def test_random_crop_flip_matches_pil_pad_crop_and_mirror():
    """Every output is one of torchvision's RandomCrop(padding) + flip outcomes on the PIL
    image (zero-padded, cropped back to H x W, mirrored or not), and all of them occur."""
    image = random_uint8(31, (6, 5, 3))
    padding = 2
    padded = ImageOps.expand(Image.fromarray(image), border=padding, fill=0)
    outcomes = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded.crop((left, top, left + 5, top + 6))
            for flip in (0, 1):
                outcomes[top, left, flip] = np.asarray(ImageOps.mirror(crop) if flip else crop)
    crops = np.asarray(jax.vmap(augment.random_crop_flip, in_axes=(0, None, None))(keys(32, 400), image, padding))
    seen = set()
    for crop in crops:
        matches = [outcome for outcome, expected in outcomes.items() if np.array_equal(crop, expected)]
        assert matches, "a crop that torchvision cannot produce"
        seen.update(matches)
    assert {flip for _, _, flip in seen} == {0, 1}
    assert {top for top, _, _ in seen} == set(range(5)) and {left for _, left, _ in seen} == set(range(5))

