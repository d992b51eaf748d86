"""Derangements: validity, uniformity (chi-square over all derangements), independence."""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from rr_jax import derangement, derangements


def all_derangements(n):
    return [p for p in itertools.permutations(range(n)) if all(p[i] != i for i in range(n))]


@pytest.mark.parametrize("n", [2, 3, 4, 7, 16, 64, 129])
def test_derangement_is_permutation_without_fixed_points(n):
    for seed in range(5):
        perm = np.asarray(derangement(jax.random.key(seed), n))
        assert perm.dtype == np.int32 and perm.shape == (n,)
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))
        assert not np.any(perm == np.arange(n))


def test_derangements_rows_are_derangements():
    rows = np.asarray(derangements(jax.random.key(1), 50, 9))
    assert rows.shape == (50, 9) and rows.dtype == np.int32
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.tile(np.arange(9), (50, 1)))
    assert not np.any(rows == np.arange(9))
    assert len({tuple(r) for r in rows}) > 40  # 14833 derangements of 9: repeats are rare


@pytest.mark.parametrize("n, count", [(4, 9), (5, 44)])
def test_uniform_over_all_derangements(n, count):
    draws = np.asarray(derangements(jax.random.key(n), 22_000, n))
    support = all_derangements(n)
    assert len(support) == count
    index = {p: k for k, p in enumerate(support)}
    observed = np.bincount([index[tuple(row)] for row in draws], minlength=count)
    assert observed.sum() == len(draws)  # every draw is one of the derangements
    assert stats.chisquare(observed).pvalue > 1e-3


def test_rows_are_independent():
    """Joint law of (row 0, row 1) of one call is the product of uniform marginals."""
    keys = jax.random.split(jax.random.key(7), 20_000)
    pairs = np.asarray(jax.vmap(lambda k: derangements(k, 2, 4))(keys))
    index = {p: k for k, p in enumerate(all_derangements(4))}
    first = np.array([index[tuple(r)] for r in pairs[:, 0]])
    second = np.array([index[tuple(r)] for r in pairs[:, 1]])
    table = np.zeros((9, 9))
    np.add.at(table, (first, second), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert np.mean(first == second) < 0.2  # identical rows would give 1.0; independent 1/9


def test_same_key_same_result_and_jit_inside():
    key = jax.random.key(3)
    np.testing.assert_array_equal(derangement(key, 10), derangement(key, 10))
    inside = jax.jit(lambda k: derangements(k, 4, 10))(key)
    np.testing.assert_array_equal(inside, derangements(key, 4, 10))


@pytest.mark.parametrize("n", [0, 1])
def test_too_small_raises(n):
    with pytest.raises(ValueError, match="no other image"):
        derangement(jax.random.key(0), n)
    with pytest.raises(ValueError, match="n >= 2"):
        derangements(jax.random.key(0), 3, n)


def test_bad_num_raises():
    with pytest.raises(ValueError, match="num=0"):
        derangements(jax.random.key(0), 0, 5)


def test_refill_rounds_stay_uniform(monkeypatch):
    """With a pool of 3 candidates most rounds fill 0 or 1 row: the refill loop is exercised."""
    from rr_jax import shuffle

    monkeypatch.setattr(shuffle, "_pool_size", lambda num: 3)
    draws = np.asarray(jax.jit(shuffle._derangements.__wrapped__, static_argnums=(1, 2))(
        jax.random.key(11), 9_000, 4
    ))
    index = {p: k for k, p in enumerate(all_derangements(4))}
    observed = np.bincount([index[tuple(row)] for row in draws], minlength=9)
    assert observed.sum() == 9_000
    assert stats.chisquare(observed).pvalue > 1e-3


def test_pool_covers_num_with_high_probability():
    """The pool size keeps the chance of a second round small (binomial tail)."""
    from rr_jax.shuffle import _pool_size

    for num in [1, 2, 31, 496, 10_000]:
        assert stats.binom(_pool_size(num), np.exp(-1)).cdf(num - 1) < 2e-3
