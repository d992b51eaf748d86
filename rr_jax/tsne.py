"""t-SNE (van der Maaten & Hinton, 2008) of frozen features, for the embedding pictures.

Exact, O(N^2) memory and time per iteration, written in JAX so that it needs no extra
dependency and runs in seconds for the 1-2k points a readable plot holds; for more
points use an approximate (Barnes-Hut) implementation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rr_jax.evaluate import check_features, check_positive
from rr_jax.numerics import squared_distances


def _conditional_p(distances: jax.Array, perplexity: float, steps: int = 100) -> jax.Array:
    """Rows p_{j|i} ∝ exp(-beta_i d_ij) (p_{i|i} = 0), beta_i set by bisection so that
    each row's entropy is log(perplexity)."""
    n = distances.shape[0]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    # Shift each row by its smallest distance: p is unchanged, exp cannot underflow.
    d = distances - jnp.min(jnp.where(off_diagonal, distances, jnp.inf), axis=1, keepdims=True)
    d = jnp.where(off_diagonal, d, jnp.inf)
    target = jnp.log(perplexity)

    def rows(beta):
        p = jnp.exp(-d * beta[:, None])
        p = p / jnp.sum(p, axis=1, keepdims=True)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)
        return p, entropy

    def bisect(_, bounds):
        beta, low, high = bounds
        _, entropy = rows(beta)
        too_flat = entropy > target  # beta must grow
        low = jnp.where(too_flat, beta, low)
        high = jnp.where(too_flat, high, beta)
        beta = jnp.where(jnp.isinf(high), beta * 2.0, (low + high) / 2.0)
        return beta, low, high

    ones = jnp.ones((n,), jnp.float32)
    beta, _, _ = jax.lax.fori_loop(0, steps, bisect, (ones, 0.0 * ones, jnp.inf * ones))
    return rows(beta)[0]


def tsne_gradient(embedding: jax.Array, p: jax.Array) -> jax.Array:
    """Gradient of KL(P || Q) with respect to the embedding Y[N, 2]:
    4 sum_j (p_ij - q_ij)(y_i - y_j) / (1 + |y_i - y_j|^2), Q the Student-t affinities."""
    n = embedding.shape[0]
    kernel = jnp.where(jnp.eye(n, dtype=bool), 0.0, 1.0 / (1.0 + squared_distances(embedding, embedding)))
    pq = (p - kernel / jnp.sum(kernel)) * kernel
    return 4.0 * (jnp.sum(pq, axis=1, keepdims=True) * embedding - pq @ embedding)


@functools.partial(jax.jit, static_argnames=("num_iters", "exaggeration_iters"))
def _tsne(features, perplexity, learning_rate, exaggeration, *, num_iters, exaggeration_iters):
    n = features.shape[0]
    x = features - jnp.mean(features, axis=0)
    p = _conditional_p(squared_distances(x, x), perplexity)
    p = jnp.maximum((p + p.T) / (2.0 * n), 1e-12)
    # PCA initialisation, scaled to a standard deviation of 1e-4 (as scikit-learn).
    _, _, vt = jnp.linalg.svd(x, full_matrices=False)
    y = x @ vt[:2].T
    y = y / jnp.std(y[:, 0]) * 1e-4

    def step(i, carry):
        y, velocity, gains = carry
        early = i < exaggeration_iters
        grad = tsne_gradient(y, jnp.where(early, exaggeration, 1.0) * p)
        # Delta-bar-delta gains and momentum, as in the reference implementation.
        gains = jnp.where(jnp.sign(grad) != jnp.sign(velocity), gains + 0.2, gains * 0.8)
        gains = jnp.maximum(gains, 0.01)
        velocity = jnp.where(early, 0.5, 0.8) * velocity - learning_rate * gains * grad
        return y + velocity, velocity, gains

    zeros = jnp.zeros_like(y)
    y, _, _ = jax.lax.fori_loop(0, num_iters, step, (y, zeros, jnp.ones_like(y)))
    return y


def tsne(
    features: jax.Array,
    *,
    perplexity: float = 30.0,
    num_iters: int = 1000,
    exaggeration: float = 12.0,
    exaggeration_iters: int = 250,
    learning_rate: float | None = None,
) -> jax.Array:
    """Exact t-SNE of features float[N, D] into 2-D; deterministic (PCA initialisation).

    The schedule is the reference one: early exaggeration for the first
    `exaggeration_iters` iterations with momentum 0.5, then 0.8; adaptive gains.
    Memory and time per iteration are O(N^2): meant for N up to a few thousand.

    Args:
      features: float[N, D], N > 3 * perplexity.
      perplexity: effective number of neighbours of each point.
      num_iters: gradient iterations.
      exaggeration: factor on P during the first iterations.
      exaggeration_iters: how many iterations are exaggerated.
      learning_rate: None for scikit-learn's 'auto', max(N / exaggeration / 4, 50).

    Returns:
      float32[N, 2].
    """
    check_features("features", features)
    n = np.shape(features)[0]
    if not 0 < perplexity < (n - 1) / 3:
        raise ValueError(
            f"perplexity must be in (0, (N - 1) / 3) = (0, {(n - 1) / 3:.4g}) for N={n} points, "
            f"got perplexity={perplexity!r}."
        )
    check_positive("num_iters", num_iters)
    if learning_rate is None:
        learning_rate = max(n / exaggeration / 4.0, 50.0)
    return _tsne(
        jnp.asarray(features, jnp.float32), perplexity, learning_rate, exaggeration,
        num_iters=num_iters, exaggeration_iters=exaggeration_iters,
    )
