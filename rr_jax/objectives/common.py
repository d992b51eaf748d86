"""Pieces several objectives share: the classification loss, PyTorch's default layer
initialisation, and the official pipeline's RandomCrop(padding) + flip views."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rr_jax.augment import normalize, random_horizontal_flip

# PyTorch's default kernel initialisation of nn.Linear / nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def classification_loss(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy and top-1 accuracy. logits float[N, C], labels int[N].

    With `class_weights` float[C], the loss is PyTorch's weighted mean
    sum_i w[y_i] * nll_i / sum_i w[y_i] (CrossEntropyLoss(weight)).
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    if class_weights is None:
        return nll.mean(), accuracy
    weights = class_weights[labels]
    return (weights * nll).sum() / weights.sum(), accuracy


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
    height, width, channels = image.shape
    crop_key, flip_key = jax.random.split(key)
    pad = config.padding
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
    crop = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))
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
