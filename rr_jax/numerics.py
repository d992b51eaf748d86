"""Numeric pieces shared by the losses and the metrics: unit rows, squared distances,
softmax cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def unit_rows(x: jax.Array) -> jax.Array:
    """Each row divided by its Euclidean norm (at least 1e-12), in float32. float[N, P] -> float32[N, P]."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def squared_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
    """|x_n - c_k|^2 at full matmul precision, clipped at 0: float[N, D], float[K, D] -> float[N, K]."""
    cross = jnp.dot(x, centres.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum((x * x).sum(1)[:, None] - 2.0 * cross + (centres * centres).sum(1)[None, :], 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy, in float32, of logits float[N, C] against int labels [N].

    With `class_weights` float[C], PyTorch's weighted mean sum_i w[y_i] nll_i / sum_i w[y_i]
    (CrossEntropyLoss(weight)).
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if class_weights is None:
        return nll.mean()
    weights = class_weights[labels]
    return (weights * nll).sum() / weights.sum()
