"""Variants of the relation head's costly part at K=32, M=64, timed side by side.

    XLA_FLAGS= python bench/bench_head_tail.py [--repeats 9] [--views 32]

The [2PM, 256] hidden layer (P = K(K-1)/2 view pairs) is where the head's time goes on
XLA:CPU. This script times, interleaved in one process with launch.py's XLA:CPU flags,
gradients of:

- gather: the factored first layer's ``first[left] + second[right]`` (rr_jax's pair
  indices) against a hand-written backward that avoids XLA's scatter (one-hot matmuls
  over view pairs, inverse-permutation gathers for the negatives): is the scatter out of
  the [2PM, 256] buffer a cost worth removing?
- tail: BatchNorm (rr_jax.batch_norm) -> LeakyReLU -> Dense(1) -> focal loss on a
  materialised [2PM, 256] hidden layer, as rr_jax computes it, against the same in a
  channels-major [256, 2PM] layout (per-channel sums become row sums) and against a
  bfloat16 hidden layer; and, for scale, one elementwise pass over the hidden layer
  (read it, write a new one): the memory traffic that any pass over it costs.

Prints one Markdown table: median ms of each and its median per-round ratio to the
first variant of its group.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from steps import BATCH  # noqa: E402
from timing import compiled, interleaved  # noqa: E402

from rr_jax.batch_norm import batch_norm_train  # noqa: E402
from rr_jax.relational import BN_EPSILON, RelationHead, pair_indices, pair_loss  # noqa: E402
from rr_jax.xla_flags import CPU_DEFAULTS  # noqa: E402

HIDDEN, SLOPE = RelationHead.hidden_dim, RelationHead.negative_slope  # the head's defaults: 256, 0.01


def gather_variants(views: int) -> dict:
    """d/d(first, second) of <first[left] + second[right], g>: autodiff vs hand-written."""
    left, right, _ = pair_indices(jax.random.key(0), views, BATCH)
    pairs = views * (views - 1) // 2
    first_view, second_view = np.triu_indices(views, k=1)
    one_hot_first = jnp.asarray(np.eye(views, dtype=np.float32)[first_view])  # [P, K]
    one_hot_second = jnp.asarray(np.eye(views, dtype=np.float32)[second_view])
    sigma = right[pairs * BATCH:].reshape(pairs, BATCH) - jnp.asarray(second_view)[:, None] * BATCH
    keys = jax.random.split(jax.random.key(1), 3)
    first, second = (jax.random.normal(k, (views * BATCH, HIDDEN)) for k in keys[:2])
    cotangent = jax.random.normal(keys[2], (left.shape[0], HIDDEN))

    def autodiff(first, second, cotangent):
        return jax.grad(lambda a, b: jnp.vdot(a[left] + b[right], cotangent), argnums=(0, 1))(first, second)

    def by_hand(first, second, cotangent):
        del first, second
        halves = cotangent.reshape(2, pairs, BATCH, HIDDEN)  # positives, negatives
        d_first = one_hot_first.T @ (halves[0] + halves[1]).reshape(pairs, -1)
        inverse = jnp.zeros((pairs, BATCH), jnp.int32).at[jnp.arange(pairs)[:, None], sigma].set(
            jnp.arange(BATCH, dtype=jnp.int32))
        negatives = jnp.take_along_axis(halves[1], inverse[:, :, None], axis=1)
        d_second = one_hot_second.T @ (halves[0] + negatives).reshape(pairs, -1)
        return d_first.reshape(-1, HIDDEN), d_second.reshape(-1, HIDDEN)

    args = (first, second, cotangent)
    for a, b in zip(autodiff(*args), by_hand(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    return {"gather: autodiff (XLA scatter)": (autodiff, args), "gather: hand-written backward": (by_hand, args)}


def tail_variants(views: int) -> dict:
    """Gradients of the head's tail on a materialised hidden layer, three layouts."""
    rows = views * (views - 1) * BATCH
    keys = jax.random.split(jax.random.key(2), 2)
    hidden = jax.random.normal(keys[0], (rows, HIDDEN))
    kernel = jax.random.normal(keys[1], (HIDDEN,)) / np.sqrt(HIDDEN)
    scale, bias = jnp.ones(HIDDEN), jnp.zeros(HIDDEN)
    targets = (jnp.arange(rows) < rows // 2).astype(jnp.float32)

    def rows_major(hidden, kernel, scale, bias):
        normed = batch_norm_train(hidden, scale, bias, BN_EPSILON, None)[0]
        return pair_loss(jax.nn.leaky_relu(normed, SLOPE) @ kernel, targets)

    def channels_major(hidden_t, kernel, scale, bias):
        mean = hidden_t.mean(1, keepdims=True)
        var = jnp.mean(jnp.square(hidden_t), 1, keepdims=True) - jnp.square(mean)
        normed = (hidden_t - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale[:, None] + bias[:, None]
        return pair_loss(kernel @ jax.nn.leaky_relu(normed, SLOPE), targets)

    def bfloat16(hidden, kernel, scale, bias):
        return rows_major(hidden.astype(jnp.bfloat16), kernel, scale, bias)

    def grad(fn):
        return jax.grad(fn, argnums=(0, 1, 2, 3))

    return {"tail: rows-major (rr_jax)": (grad(rows_major), (hidden, kernel, scale, bias)),
            "tail: channels-major": (grad(channels_major), (hidden.T, kernel, scale, bias)),
            "tail: bfloat16 hidden": (grad(bfloat16), (hidden, kernel, scale, bias)),
            "reference: one elementwise pass (2 * hidden)": (lambda hidden: 2 * hidden, (hidden,))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--views", type=int, default=32)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, K={args.views}, M={BATCH}, "
          f"median of {args.repeats}\n")
    print("| variant | ms | ratio to the group's first |")
    print("|---|---|---|")
    for group in (gather_variants(args.views), tail_variants(args.views)):
        runs = {name: compiled(fn, *inputs, options=CPU_DEFAULTS)[0] for name, (fn, inputs) in group.items()}
        medians, ratios = interleaved(runs, args.repeats)
        for name in runs:
            print(f"| {name} | {medians[name]:.1f} | {ratios[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
