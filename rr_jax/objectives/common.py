"""Pieces several objectives share: the classification loss, PyTorch's default layer
initialisation, the official pipeline's RandomCrop(padding) + flip views, rows of the
whole global batch, unit rows, and the checks of numeric method settings."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from rr_jax.augment import normalize, padded_crop, random_horizontal_flip
from rr_jax.numerics import cross_entropy
from rr_jax.objectives import config_error


def classification_loss(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy and top-1 accuracy. logits float[N, C], labels int[N].

    With `class_weights` float[C], the loss is PyTorch's weighted mean
    sum_i w[y_i] * nll_i / sum_i w[y_i] (CrossEntropyLoss(weight)).
    """
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return cross_entropy(logits, labels, class_weights), accuracy


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """The official pipeline of the supervised, RotationNet and DeepCluster runs:
    RandomCrop(H, padding) on the zero-padded uint8 image, a horizontal flip with
    probability `flip_prob`, then normalisation with `mean` and `std` (pixels in [0, 1]).
    Frozen and hashable (a static jit argument)."""

    padding: int
    flip_prob: float = 0.5
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"padding must be an int >= 0, got padding={self.padding!r}.")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got flip_prob={self.flip_prob!r}.")


def _crop_flip_image(key: jax.Array, image: jax.Array, config: CropFlip) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    top, left = jax.random.randint(crop_key, (2,), 0, 2 * config.padding + 1)
    crop = padded_crop(image, config.padding, top, left)
    view = random_horizontal_flip(flip_key, crop.astype(jnp.float32) / 255.0, prob=config.flip_prob)
    return normalize(view, mean=config.mean, std=config.std)


@functools.partial(jax.jit, static_argnums=(2, 3))
def crop_flip_views(key: jax.Array, images: jax.Array, num_views: int, config: CropFlip) -> jax.Array:
    """`num_views` CropFlip views of every image: uint8[B, H, W, C] -> float32[K, B, H, W, C]."""
    if images.dtype != jnp.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8[B, H, W, C], got {images.dtype}{list(images.shape)}.")
    keys = jax.random.split(key, (num_views, images.shape[0]))
    per_image = jax.vmap(functools.partial(_crop_flip_image, config=config))
    return jax.vmap(per_image, in_axes=(0, None))(keys, images)


def gather_batch(x: jax.Array, axis_name: str | None) -> jax.Array:
    """The rows of every device, in device order: x float[B, ...] -> float[devices * B, ...]
    (x itself without `axis_name`). Gradients flow back to each device's own rows (the
    transpose of the all-gather), so a loss of the global batch computed alike on every
    device gets, averaged over devices, the single-device gradient."""
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def check_settings(method: str, settings: ml_collections.ConfigDict, *, positive_ints: Sequence[str] = (),
                   positive: Sequence[str] = (), unit_interval: Sequence[str] = (),
                   non_negative: Sequence[str] = ()) -> None:
    """Raises `config_error` naming `config.<method>.<key>` for the first value out of its
    range: a positive integer, a number > 0, in [0, 1], or >= 0."""
    checks = [(positive_ints, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               "it must be a positive integer"),
              (positive, lambda v: v > 0, "it must be > 0"),
              (unit_interval, lambda v: 0 <= v <= 1, "it must be in [0, 1]"),
              (non_negative, lambda v: v >= 0, "it must be >= 0")]
    for keys, ok, allowed in checks:
        for key in keys:
            value = settings[key]
            if isinstance(value, str) or value is None or not ok(value):
                raise config_error(f"{method}.{key}", value, allowed)
