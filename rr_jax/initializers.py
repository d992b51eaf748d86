"""PyTorch's default initialisations, for layers ported from reference implementations."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def uniform_fan_in(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's nn.Linear weights and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""The same distribution for a kernel whose fan-in is read off its shape (nn.Linear and
nn.Conv2d weights), drawn by Flax's variance scaling: a draw of its own, which the
recorded results of the methods using it were trained with."""
