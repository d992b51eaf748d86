"""On-device image augmentation: the paper's view pipeline as pure JAX.

The reference implementation augments every image K times with PIL on the host. Here
each view is produced on the accelerator inside the jitted train step: every op is a
pure function of one image (float32[H, W, C] in [0, 1]) and, when random, of one PRNG
key; `augment_views` vmaps the per-image pipeline over K views x B images with one key
per (view, image). Random application uses `jnp.where` on a Bernoulli draw, never
Python control flow on random values, so shapes stay static and nothing recompiles.

Pipeline (torchvision semantics, the order of the reference code):
  RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3), bilinear) -> horizontal flip
  (p=0.5) -> ColorJitter(0.8, 0.8, 0.8, 0.2) applied with p=0.8 -> grayscale (p=0.2)
  -> normalisation (x - mean) / std.

Differences from the PIL pipeline: pixels stay float32 between ops (PIL rounds to
uint8 after each), and the contrast reference is the exact mean of the grayscale image
(PIL rounds it to an integer).

One-channel images (Fashion-MNIST) are treated as gray images, as PIL treats mode "L":
a gray image has zero saturation, so saturation and hue adjustments are exact no-ops,
grayscale is the identity, and brightness and contrast act as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Index of each colour-jitter op in `order` and `factors` (torchvision's numbering).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_SCALAR_FIELDS = (
    "flip_prob", "brightness", "contrast", "saturation", "hue", "jitter_prob", "grayscale_prob"
)
# torchvision's RandomResizedCrop.get_params tries this many boxes before falling back.
_CROP_ATTEMPTS = 10


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {name}={value!r}.")


def _check_range(name: str, value: tuple[float, ...], upper: float) -> None:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= upper:
        raise ValueError(
            f"{name} must be (lo, hi) with 0 < lo <= hi <= {upper}, got {name}={value!r}."
        )


def _float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {name}={value!r}.") from None


def _float_tuple(name: str, value) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of numbers, got {name}={value!r}.") from None


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Every parameter of the view pipeline; frozen and hashable (a static jit argument).

    The defaults are the paper's pipeline with no normalisation (mean 0, std 1); the
    training pipeline passes the dataset's per-channel statistics (of pixels in [0, 1])
    as `mean` and `std`. Sequences are stored as tuples of floats.

    Attributes:
      out_size: (height, width) of the views, an int for a square, or None for the
        input size.
      crop_scale: range of the crop's area as a fraction of the image, 0 < lo <= hi <= 1.
      crop_ratio: range of the crop's aspect ratio width / height (sampled
        log-uniformly), 0 < lo <= hi.
      flip_prob: probability of a horizontal flip.
      brightness, contrast, saturation: jitter strengths s >= 0; factors are uniform in
        [max(0, 1 - s), 1 + s].
      hue: jitter strength in [0, 0.5]; the shift is uniform in [-hue, hue] (a fraction
        of the hue circle).
      jitter_prob: probability of applying the colour jitter.
      grayscale_prob: probability of converting to grayscale.
      mean, std: normalisation statistics, length 1 (broadcast over channels) or C.
    """

    out_size: int | tuple[int, int] | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio", "mean", "std"):
            object.__setattr__(self, name, _float_tuple(name, getattr(self, name)))
        for name in _SCALAR_FIELDS:
            object.__setattr__(self, name, _float(name, getattr(self, name)))
        if self.out_size is not None:
            size = self.out_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                raise ValueError(
                    "out_size must be None, a positive int or a pair of positive ints, "
                    f"got out_size={self.out_size!r}."
                )
            object.__setattr__(self, "out_size", size)
        _check_range("crop_scale", self.crop_scale, upper=1.0)
        _check_range("crop_ratio", self.crop_ratio, upper=math.inf)
        for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
            _check_probability(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)!r}.")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got hue={self.hue!r}.")
        for name in ("mean", "std"):
            if not getattr(self, name):
                raise ValueError(f"{name} must hold 1 or C values, got {name}=().")
        if not all(s > 0.0 for s in self.std):
            raise ValueError(f"std must be > 0 in every channel, got std={self.std!r}.")


# --------------------------------------------------------------------------- geometry


def _fallback_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback: the largest central crop with the ratio clamped to range."""
    if width / height < ratio[0]:
        return round(width / ratio[0]), width
    if width / height > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> jax.Array:
    """Samples a crop box like torchvision's ``RandomResizedCrop.get_params``.

    Ten candidate boxes are drawn at once: area fraction uniform in `scale`, aspect ratio
    w / h log-uniform in `ratio`, w = round(sqrt(area * ratio)), h = round(sqrt(area /
    ratio)); a box is valid if 0 < w <= width and 0 < h <= height. The first valid one
    wins and gets a uniform integer offset; if none is valid, the largest central crop
    with the ratio clamped to `ratio` is taken.

    Args:
      key: PRNG key.
      height, width: static image size.
      scale: static (lo, hi) range of the area fraction.
      ratio: static (lo, hi) range of the aspect ratio.

    Returns:
      int32[4]: (top, left, h, w) of the box.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(
        k_area, (_CROP_ATTEMPTS,), minval=scale[0], maxval=scale[1]
    )
    aspect = jnp.exp(
        jax.random.uniform(
            k_ratio, (_CROP_ATTEMPTS,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
        )
    )
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(valid)  # index of the first valid attempt; 0 if there is none
    found = valid[first]
    fallback_h, fallback_w = _fallback_crop_size(height, width, ratio)
    h = jnp.where(found, h[first], fallback_h)
    w = jnp.where(found, w[first], fallback_w)
    top = jnp.where(found, jax.random.randint(k_top, (), 0, height - h + 1), (height - h) // 2)
    left = jnp.where(found, jax.random.randint(k_left, (), 0, width - w + 1), (width - w) // 2)
    return jnp.stack([top, left, h, w])


def _resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """float32[out_size, in_size]: bilinear weights resizing [start, start + length) to out_size.

    Half-pixel centres (align_corners=False). The triangle filter is widened by the
    downscaling factor when shrinking (antialiasing, as PIL and torchvision's
    antialias=True do); pixels outside the box get weight 0 and each row is
    renormalised, which clamps at the box's edges.
    """
    start = start.astype(jnp.float32)
    length = length.astype(jnp.float32)
    step = length / out_size
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
    pixel = jnp.arange(in_size, dtype=jnp.float32) + 0.5
    weights = jnp.maximum(
        0.0, 1.0 - jnp.abs(pixel[None, :] - centre[:, None]) / jnp.maximum(step, 1.0)
    )
    weights = jnp.where((pixel > start) & (pixel < start + length), weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image: jax.Array, box: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """Crops `box` = (top, left, h, w) from `image` and resizes it bilinearly.

    Computed as R_y @ image @ R_x^T with per-box interpolation matrices R_y[H', H] and
    R_x[W', W]: two small matmuls with static shapes whatever the box, the op
    accelerators are best at. Unlike ``jax.image.scale_and_translate``, the matrices
    never sample outside the box (torchvision crops, then resizes), and on CPU they were
    faster both than it and than gathering the two bilinear taps per output pixel.

    Args:
      image: float32[H, W, C].
      box: int[4] (top, left, h, w), inside the image.
      out_size: static (H', W').

    Returns:
      float32[H', W', C].
    """
    height, width, _ = image.shape
    top, left, h, w = box
    rows = _resize_weights(top, h, height, out_size[0])
    cols = _resize_weights(left, w, width, out_size[1])
    image = jnp.einsum("oh,hwc->owc", rows, image, precision="highest")
    return jnp.einsum("pw,owc->opc", cols, image, precision="highest")


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    out_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> jax.Array:
    """torchvision's RandomResizedCrop (bilinear): float32[H, W, C] -> float32[H', W', C]."""
    height, width, _ = image.shape
    box = sample_crop_box(key, height, width, scale=scale, ratio=ratio)
    return resized_crop(image, box, out_size)


def random_horizontal_flip(key: jax.Array, image: jax.Array, *, prob: float) -> jax.Array:
    """Mirrors float32[H, W, C] left-right with probability `prob`."""
    return jnp.where(jax.random.bernoulli(key, prob), image[:, ::-1], image)


# ----------------------------------------------------------------------------- colour


def _luma(image: jax.Array) -> jax.Array:
    """float32[H, W, 1] grayscale (ITU-R 601-2 luma); a one-channel image is its own."""
    if image.shape[-1] == 1:
        return image
    # A sum of channel slices: XLA:CPU does not vectorise a reduction over a minor axis of 3.
    red, green, blue = (image[..., c : c + 1] for c in range(3))
    return _LUMA_WEIGHTS[0] * red + _LUMA_WEIGHTS[1] * green + _LUMA_WEIGHTS[2] * blue


def _mean_luma(image: jax.Array) -> jax.Array:
    """Mean of the grayscale image: one dot product with the luma weights tiled per pixel.

    (On CPU a dot is twice as fast as the equivalent broadcast-multiply-and-reduce.)
    """
    height, width, channels = image.shape
    weights = _LUMA_WEIGHTS if channels == 3 else (1.0,)
    tiled = jnp.tile(jnp.asarray(weights, image.dtype), height * width)
    return jnp.dot(image.reshape(-1), tiled, precision="highest") / (height * width)


def _blend(image: jax.Array, reference: jax.Array, factor: jax.Array) -> jax.Array:
    """factor * image + (1 - factor) * reference, clamped to [0, 1].

    Written as image + (1 - factor) * (reference - image) so that factor 1, or a
    reference equal to the image, returns the image bit for bit.
    """
    return jnp.clip(image + (1.0 - factor) * (reference - image), 0.0, 1.0)


def adjust_hue(image: jax.Array, hue_shift: jax.Array) -> jax.Array:
    """Rotates the HSV hue of float32[H, W, 3] by `hue_shift` (a fraction of the circle).

    Saturation and value are kept. Uses the closed form of HSV -> RGB,
    channel_n = V - C * clip(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6, n = 5, 3, 1
    for R, G, B and chroma C = max - min, which needs no branch per hue sector. A
    one-channel image has no hue and is returned unchanged.
    """
    if image.shape[-1] == 1:
        return image
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    inverse_chroma = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
    # Hue in sextants [-1, 5), priority red > green > blue on ties (as colorsys).
    hue = jnp.where(
        value == red,
        (green - blue) * inverse_chroma,
        jnp.where(
            value == green,
            2.0 + (blue - red) * inverse_chroma,
            4.0 + (red - green) * inverse_chroma,
        ),
    )
    hue = hue + 6.0 * hue_shift
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + hue
        k = k - 6.0 * jnp.floor(k / 6.0)  # k mod 6; jnp.mod is a slow scalar call on CPU
        channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.clip(jnp.stack(channels, axis=-1), 0.0, 1.0)


def to_grayscale(image: jax.Array) -> jax.Array:
    """ITU-R 601-2 luma 0.299 R + 0.587 G + 0.114 B, replicated to the C channels."""
    return jnp.broadcast_to(_luma(image), image.shape)


def sample_color_jitter(
    key: jax.Array, *, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[jax.Array, jax.Array]:
    """Samples torchvision ColorJitter's order and factors.

    Returns:
      order: int32[4], a uniform random permutation of (BRIGHTNESS, CONTRAST,
        SATURATION, HUE) = (0, 1, 2, 3): the order the ops are applied in.
      factors: float32[4] indexed by op: brightness, contrast and saturation factors
        uniform in [max(0, 1 - s), 1 + s], then the hue shift uniform in [-hue, hue].
    """
    k_order, k_factors = jax.random.split(key)
    strengths = jnp.asarray((brightness, contrast, saturation), jnp.float32)
    low = jnp.append(jnp.maximum(0.0, 1.0 - strengths), -hue)
    high = jnp.append(1.0 + strengths, hue)
    factors = jax.random.uniform(k_factors, (4,), minval=low, maxval=high)
    return jax.random.permutation(k_order, 4).astype(jnp.int32), factors


def adjust_color(image: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    """Brightness, contrast or saturation of float32[H, W, C], chosen by the (traced) index
    `op` in {BRIGHTNESS, CONTRAST, SATURATION}, clamped to [0, 1]: the image blended with
    black (brightness), the mean of its grayscale image (contrast) or its grayscale image
    (saturation; factor 0 gives the grayscale image, a one-channel image is unchanged)."""
    reference = jnp.where(
        op == BRIGHTNESS, 0.0, jnp.where(op == CONTRAST, _mean_luma(image), _luma(image))
    )
    return _blend(image, reference, factor)


def apply_color_jitter(image: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
    """Applies the four colour ops to float32[H, W, C] in `order` with `factors`.

    `order` and `factors` are as returned by `sample_color_jitter`; every op clamps to
    [0, 1]. Brightness, contrast and saturation are one cheap blend each; hue is the
    costly op, so it is computed once: the blends sampled before it, hue, then the
    blends sampled after it, each blend slot switched on or off by `jnp.where`.
    """
    hue_position = jnp.argmax(order == HUE)
    slots = jnp.arange(3)
    blend_ops = jnp.where(slots < hue_position, order[:3], order[1:])  # `order` without HUE

    def blends(image, active):
        for slot in range(3):
            op = blend_ops[slot]
            image = jnp.where(active[slot], adjust_color(image, op, factors[op]), image)
        return image

    image = blends(image, slots < hue_position)
    image = adjust_hue(image, factors[HUE])
    return blends(image, slots >= hue_position)


def random_color_jitter(
    key: jax.Array,
    image: jax.Array,
    *,
    prob: float,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> jax.Array:
    """torchvision's RandomApply([ColorJitter(...)], p=prob) on float32[H, W, C].

    With probability `prob`, applies brightness, contrast, saturation and hue with the
    given strengths in a random order (`sample_color_jitter`, `apply_color_jitter`).
    """
    k_apply, k_jitter = jax.random.split(key)
    order, factors = sample_color_jitter(
        k_jitter, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
    )
    jittered = apply_color_jitter(image, order, factors)
    return jnp.where(jax.random.bernoulli(k_apply, prob), jittered, image)


def random_grayscale(key: jax.Array, image: jax.Array, *, prob: float) -> jax.Array:
    """Converts float32[H, W, C] to grayscale (keeping C channels) with probability `prob`."""
    return jnp.where(jax.random.bernoulli(key, prob), to_grayscale(image), image)


# --------------------------------------------------------------------------- pipeline


def normalize(image: jax.Array, *, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """(image - mean) / std over the last (channel) axis; mean and std of length 1 or C."""
    return (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def to_unit_float(images: jax.Array) -> jax.Array:
    """uint8 pixels [..., C] -> float32 in [0, 1] (x / 255), the input of every op here."""
    return jnp.asarray(images).astype(jnp.float32) / 255.0


def normalize_images(images: jax.Array, *, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8[..., C] -> float32 (x / 255 - mean) / std: what the backbone sees of an
    unaugmented image (evaluation, probes), normalised as the pretraining views."""
    return normalize(to_unit_float(images), mean=mean, std=std)


def padded_crop(image: jax.Array, padding: int, top: jax.Array, left: jax.Array) -> jax.Array:
    """The HxW window at (top, left), each in [0, 2 * padding], of the image zero-padded by
    `padding` on each side: torchvision's RandomCrop(padding) at a drawn offset. [H, W, C] -> [H, W, C]."""
    height, width, channels = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))


def random_crop_flip(key: jax.Array, image: jax.Array, padding: int) -> jax.Array:
    """A random HxW crop of the image zero-padded by `padding` on each side, mirrored
    left-right with probability 1/2 (torchvision RandomCrop(padding) + flip; the
    augmentation of fine-tuning).

    image: [H, W, C] of any dtype (zero padding is black for uint8 pixels).
    """
    top_key, left_key, flip_key = jax.random.split(key, 3)
    top = jax.random.randint(top_key, (), 0, 2 * padding + 1)
    left = jax.random.randint(left_key, (), 0, 2 * padding + 1)
    return random_horizontal_flip(flip_key, padded_crop(image, padding, top, left), prob=0.5)


def _augment_image(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
    """One view of uint8[H, W, C]: float32[H', W', C], normalised."""
    height, width, _ = image.shape
    k_crop, k_flip, k_jitter, k_gray = jax.random.split(key, 4)
    view = to_unit_float(image)
    view = random_resized_crop(
        k_crop,
        view,
        out_size=config.out_size or (height, width),
        scale=config.crop_scale,
        ratio=config.crop_ratio,
    )
    view = random_horizontal_flip(k_flip, view, prob=config.flip_prob)
    view = random_color_jitter(
        k_jitter,
        view,
        prob=config.jitter_prob,
        brightness=config.brightness,
        contrast=config.contrast,
        saturation=config.saturation,
        hue=config.hue,
    )
    view = random_grayscale(k_gray, view, prob=config.grayscale_prob)
    return normalize(view, mean=config.mean, std=config.std)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _augment_views(
    key: jax.Array, images: jax.Array, num_views: int, config: AugmentConfig
) -> jax.Array:
    keys = jax.random.split(key, (num_views, images.shape[0]))
    per_image = jax.vmap(functools.partial(_augment_image, config=config))
    return jax.vmap(per_image, in_axes=(0, None))(keys, images)


def augment_views(
    key: jax.Array, images: jax.Array, num_views: int, config: AugmentConfig | None = None
) -> jax.Array:
    """K random views of every image of a batch, augmented on device.

    Each (view, image) pair gets its own key; the per-image pipeline is crop -> flip ->
    colour jitter -> grayscale -> normalisation (see the module docstring). Jit-able:
    `num_views` and `config` are static.

    Args:
      key: PRNG key.
      images: uint8[B, H, W, C] with C in {1, 3}.
      num_views: K >= 1, static.
      config: the pipeline's parameters; None means the paper's pipeline with no
        normalisation (`AugmentConfig()`).

    Returns:
      float32[K, B, H', W', C], (H', W') = config.out_size or (H, W).
    """
    config = AugmentConfig() if config is None else config
    if not isinstance(config, AugmentConfig):
        raise ValueError(f"config must be an AugmentConfig or None, got {type(config).__name__}.")
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            "images must be uint8[B, H, W, C] with C in {1, 3}, got "
            f"{images.dtype}{list(images.shape)}."
        )
    if not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be an int >= 1, got num_views={num_views!r}.")
    channels = images.shape[-1]
    for name in ("mean", "std"):
        if len(getattr(config, name)) not in (1, channels):
            raise ValueError(
                f"{name} must hold 1 or C={channels} values, got {name}={getattr(config, name)!r}."
            )
    return _augment_views(key, images, num_views, config)
