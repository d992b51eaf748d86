"""Frozen-backbone features: the feature size and eval-mode features of a backbone.

`extract_features` maps uint8 images to features with the backbone in eval mode
(BatchNorm running statistics) on images normalised as in pretraining; `feature_dim`
checks that a backbone takes a dataset's images. The pretraining monitors, the linear
probe and `rr_jax.evaluate_run` all call these, so they preprocess identically; what
they read from a workdir comes from `rr_jax.evaluation_inputs`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rr_jax.augment import normalize_images
from rr_jax.errors import ConfigError

FEATURE_BATCH_SIZE = 512
_AXIS = "batch"


def feature_dim(
    backbone: nn.Module, variables: Any, image_shape: tuple[int, int, int], dataset: str = ""
) -> int:
    """D, the feature size of the backbone with these variables on images [H, W, C].

    Raises:
      ValueError: the backbone cannot take images of `image_shape` (e.g. a backbone
        pretrained on RGB images and gray ones).
    """
    try:
        shape = jax.eval_shape(
            functools.partial(backbone.apply, train=False),
            variables,
            jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
        ).shape
    except flax.errors.FlaxError as error:
        raise ConfigError(
            f"The pretrained backbone cannot take images of shape {tuple(image_shape)}"
            f"{f' of dataset {dataset!r}' if dataset else ''}: {error} Use a dataset "
            "with as many channels as the pretraining images."
        ) from error
    return shape[-1]


@functools.partial(jax.jit, static_argnames=("backbone", "mean", "std"))
def eval_features(variables: Any, images: jax.Array, *, backbone: nn.Module, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> jax.Array:
    """Eval-mode features float32[B, D] of one batch of uint8[B, H, W, C] images (jitted)."""
    return backbone.apply(variables, normalize_images(images, mean=mean, std=std), train=False)


def extract_features(
    backbone: nn.Module,
    variables: Any,
    images: np.ndarray,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = FEATURE_BATCH_SIZE,
    devices: list[jax.Device] | None = None,
) -> np.ndarray:
    """Features of the backbone in eval mode on normalised images, in order.

    Each batch is split over `devices` (default: all local devices) by one jit-compiled
    call on sharded inputs; the last batch is padded, and the padding dropped.

    Args:
      backbone, variables: a backbone module and its {'params', 'batch_stats'}.
      images: uint8[N, H, W, C].
      mean, std: per-channel statistics of pixels in [0, 1].
      batch_size: images per call, rounded up to a multiple of the device count.
      devices: the devices to spread each batch over.

    Returns:
      float32[N, D] NumPy array.
    """
    if np.ndim(images) != 4 or np.asarray(images).dtype != np.uint8:
        raise ValueError(
            f"images must be uint8[N, H, W, C], got {np.asarray(images).dtype}{np.shape(images)}."
        )
    devices = jax.local_devices() if devices is None else list(devices)
    mesh = jax.sharding.Mesh(np.array(devices), (_AXIS,))
    spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(variables, replicated)
    batch_size = -(-batch_size // len(devices)) * len(devices)
    options = dict(backbone=backbone, mean=tuple(mean), std=tuple(std))
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = np.pad(batch, ((0, batch_size - len(batch)),) + ((0, 0),) * 3)
        outputs.append(eval_features(variables, jax.device_put(batch, spread), **options))
    return np.concatenate(jax.device_get(outputs))[: len(images)]
