"""BatchNorm with a hand-written backward pass and matmul reductions on CPU.

``BatchNorm`` is a drop-in for the part of ``flax.linen.BatchNorm`` the backbones use,
with the same variables (params ``scale``, ``bias``; batch_stats ``mean``, ``var``) and
the same statistics (batch mean and biased variance, E[x^2] - E[x]^2 in float32,
running averages ``momentum * old + (1 - momentum) * new``), so checkpoints and the
PyTorch converter see no difference. What differs is the cost on XLA:CPU:

- The training-mode backward is the closed form
  ``dx = scale / sigma * (g - mean(g) - xhat * mean(g * xhat))``: two per-channel
  reductions and one elementwise pass, where automatic differentiation of the forward
  produces more reductions and intermediate arrays.
- On CPU every per-channel sum over [N, ..., C] is a matrix-vector product
  ``ones[N] @ x[N, rest]`` followed by a small sum; XLA:CPU runs the plain reduction as a
  tree of strided reduce-windows. Forward + backward ~2x faster than Flax's BatchNorm
  with YNNPACK fusions off, ResNet-32's step 1.1x (BENCHMARKS.md, "Backbones on CPU").
  Other backends reduce natively (and a float32 matmul on a TPU would round to bfloat16):
  the choice is made per lowering platform, so they compile the plain reduction.

Under ``axis_name`` the statistics, and the two gradient means, are averaged across
devices (every device must hold the same number of rows), which gives each device the
gradient of the sum of the devices' losses, as automatic differentiation would.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def channel_sum(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last: [N, ..., C] -> [C], in x's dtype.

    The matmul form is chosen when the computation is lowered for CPU
    (`lax.platform_dependent`), so a program lowered for GPU or TPU holds only the plain
    reduction, whatever the default backend of the process that traced it.
    """

    def plain(x):
        return jnp.sum(x, axis=tuple(range(x.ndim - 1)))

    def matmul(x):
        rows = x.shape[0]
        per_position = jnp.ones((rows,), x.dtype) @ x.reshape(rows, -1)  # [prod(...) * C]
        return per_position.reshape(-1, x.shape[-1]).sum(axis=0)

    if x.ndim < 2:
        return plain(x)
    return lax.platform_dependent(x, cpu=matmul, default=plain)


def _global_means(sums: jax.Array, count: int, axis_name: str | None) -> jax.Array:
    """Per-device sums over ``count`` rows -> means over the rows of every device."""
    means = sums / count
    return means if axis_name is None else lax.pmean(means, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises x[N, ..., C] with its batch statistics over every axis but the last.

    Returns ``(y, mean, var)``: y[N, ..., C] in x's dtype, and the batch mean and biased
    variance [C] (float32 or wider) for the running averages. Gradients flow to x, scale
    and bias through y only: mean and var are treated as constants.
    """
    return _batch_norm_forward(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_forward(x, scale, bias, epsilon, axis_name):
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(compute)
    count = x.size // x.shape[-1]
    mean, mean_square = _global_means(jnp.stack([channel_sum(xf), channel_sum(xf * xf)]), count, axis_name)
    var = jnp.maximum(mean_square - mean * mean, 0.0)
    inv_std = lax.rsqrt(var + epsilon)
    y = (xf - mean) * (scale * inv_std) + bias
    return (y.astype(x.dtype), mean, var), (x, mean, inv_std, scale)


def _batch_norm_backward(epsilon, axis_name, residuals, cotangents):
    del epsilon  # inv_std already holds it
    x, mean, inv_std, scale = residuals
    g = cotangents[0].astype(mean.dtype)
    xhat = (x.astype(mean.dtype) - mean) * inv_std
    sums = jnp.stack([channel_sum(g), channel_sum(g * xhat)])  # d bias, d scale
    g_mean, g_xhat_mean = _global_means(sums, x.size // x.shape[-1], axis_name)
    dx = (scale * inv_std) * (g - g_mean - xhat * g_xhat_mean)
    return dx.astype(x.dtype), sums[1].astype(scale.dtype), sums[0].astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last (channels), ``[N, ..., C] -> [N, ..., C]``.

    Attributes:
      use_running_average: normalise with the running statistics (eval) instead of the
        batch's (train, which also updates the running statistics); may instead be
        passed to ``__call__``.
      momentum: weight of the old running statistic (0.9 is PyTorch's momentum 0.1).
      epsilon: added to the variance.
      axis_name: mapped axis to average the batch statistics over, or None.
      dtype: dtype of the output (default: x's and the parameters' promoted); the
        statistics and the normalisation are computed in float32 or wider regardless.
      param_dtype: dtype of scale and bias.
      use_scale, use_bias: learn a scale and a bias (False: 1 and 0, no parameter; both
        False is PyTorch's affine=False).
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        channels = x.shape[-1]
        stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), stats_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), stats_dtype)
        scale = (self.param("scale", nn.initializers.ones, (channels,), self.param_dtype) if self.use_scale
                 else jnp.ones((channels,), self.param_dtype))
        bias = (self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype) if self.use_bias
                else jnp.zeros((channels,), self.param_dtype))
        dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)

        if use_running_average:
            compute = jnp.promote_types(dtype, jnp.float32)
            inv_std = lax.rsqrt(running_var.value + self.epsilon)
            y = (x.astype(compute) - running_mean.value) * (scale * inv_std) + bias
            return y.astype(dtype)

        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y.astype(dtype)
