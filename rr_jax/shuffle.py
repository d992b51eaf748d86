"""Uniform random derangements (permutations without fixed points).

Negatives pair image m of one view with image sigma(m) of another view; sigma must
have no fixed point, or a "negative" would be a positive. We draw a uniform random
permutation and redraw while it has a fixed point (rejection sampling). Conditioning
a uniform permutation on "no fixed point" is uniform over derangements, and about
1/e of permutations are derangements, so the expected number of draws is e ~ 2.72
for every n (the loop runs on device inside `lax.while_loop`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _check_size(n: int) -> None:
    if not isinstance(n, int) or n < 2:
        raise ValueError(
            f"A derangement needs n >= 2 elements, got n={n!r}: a batch of one image "
            "has no other image to form a negative pair with."
        )


@functools.partial(jax.jit, static_argnums=1)
def _derangement(key: jax.Array, n: int) -> jax.Array:
    arange = jnp.arange(n, dtype=jnp.int32)

    def draw(state):
        key, _ = state
        key, subkey = jax.random.split(key)
        return key, jax.random.permutation(subkey, arange)

    def has_fixed_point(state):
        return jnp.any(state[1] == arange)

    # Start from the identity: it has fixed points, so at least one draw happens.
    return jax.lax.while_loop(has_fixed_point, draw, (key, arange))[1]


def derangement(key: jax.Array, n: int) -> jax.Array:
    """One uniform random derangement of ``range(n)``.

    Args:
      key: PRNG key.
      n: static size, n >= 2.

    Returns:
      int32[n] permutation ``p`` with ``p[m] != m`` for every m; every derangement of
      n elements is equally likely.
    """
    _check_size(n)
    return _derangement(key, n)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _derangements(key: jax.Array, num: int, n: int) -> jax.Array:
    return jax.vmap(_derangement, in_axes=(0, None))(jax.random.split(key, num), n)


def derangements(key: jax.Array, num: int, n: int) -> jax.Array:
    """``num`` independent uniform derangements of ``range(n)``, drawn in parallel.

    Args:
      key: PRNG key.
      num: static number of derangements, num >= 1.
      n: static size of each, n >= 2.

    Returns:
      int32[num, n]; row r is a uniform derangement independent of the other rows.
    """
    _check_size(n)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got num={num!r}.")
    return _derangements(key, num, n)
