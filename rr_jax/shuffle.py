"""Uniform random derangements (permutations without fixed points).

Negatives pair image m of one view with image sigma(m) of another view; sigma must
have no fixed point, or a "negative" would be a positive. We use rejection sampling:
a uniform random permutation conditioned on having no fixed point is a uniform
derangement, and about 1/e of all permutations are derangements.

For `num` derangements at once we draw a pool of about e * num candidate
permutations in one vectorised step and keep the first `num` valid ones. Which
candidates are valid is independent of which derangement each valid one is, so the
kept rows are independent and uniform. The pool is sized so that a shortfall (then
filled by another pool, inside `lax.while_loop`) happens with probability ~1e-4;
this costs ~e draws per derangement instead of the ~log(num)/0.46 rounds over all
rows that a per-row retry loop needs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _check_size(n: int) -> None:
    if not isinstance(n, int) or n < 2:
        raise ValueError(
            f"A derangement needs n >= 2 elements, got n={n!r}: a batch of one image "
            "has no other image to form a negative pair with."
        )


def _uniform_permutations(key: jax.Array, num: int, n: int) -> jax.Array:
    """int32[num, n] independent uniform permutations: argsort of random 64-bit keys."""
    high, low = jax.random.bits(key, (2, num, n), jnp.uint32)
    index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (num, n))
    # Ties in 64 random bits (probability ~n^2 / 2^65) fall back to index order.
    return jax.lax.sort((high, low, index), dimension=1, num_keys=2)[2]


def _pool_size(num: int) -> int:
    """Candidates per round: mean number of valid ones minus 4 sigma still covers num."""
    valid_rate = math.exp(-1.0)
    return math.ceil((num + 4.0 * math.sqrt(num * (1.0 - valid_rate)) + 1.0) / valid_rate)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _derangements(key: jax.Array, num: int, n: int) -> jax.Array:
    identity = jnp.arange(n, dtype=jnp.int32)
    pool = _pool_size(num)

    def draw_pool(state):
        key, rows, filled = state
        key, subkey = jax.random.split(key)
        candidates = _uniform_permutations(subkey, pool, n)
        valid = ~jnp.any(candidates == identity, axis=1)
        slot = filled + jnp.cumsum(valid) - 1  # row that each valid candidate fills
        slot = jnp.where(valid & (slot < num), slot, num)  # num: out of range, dropped
        rows = rows.at[slot].set(candidates, mode="drop", unique_indices=True)
        return key, rows, jnp.minimum(filled + valid.sum(), num)

    rows = jnp.zeros((num, n), jnp.int32)
    state = (key, rows, jnp.zeros((), jnp.int32))
    return jax.lax.while_loop(lambda state: state[2] < num, draw_pool, state)[1]


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


def derangement(key: jax.Array, n: int) -> jax.Array:
    """One uniform random derangement of ``range(n)``.

    Args:
      key: PRNG key.
      n: static size, n >= 2.

    Returns:
      int32[n] permutation ``p`` with ``p[m] != m`` for every m; every derangement of
      n elements is equally likely.
    """
    return derangements(key, 1, n)[0]
