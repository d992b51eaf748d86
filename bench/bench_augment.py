"""Times augment_views against the Conv4 forward+backward pass it feeds.

The paper's setting: K=32 views of B=64 CIFAR-sized images, i.e. 2048 views per step.
Acceptance: augmentation costs at most 25% of a Conv4 forward+backward on those views.

  python bench/bench_augment.py [--views 32] [--batch 64] [--size 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rr_jax.augment import AugmentConfig, augment_views
from rr_jax.backbones import Conv4

CIFAR10_CONFIG = AugmentConfig(mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262))


def time_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of fn() after one warm-up (compilation) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = jnp.asarray(
        rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    )
    key = jax.random.key(0)
    augment = jax.jit(lambda key: augment_views(key, images, args.views, CIFAR10_CONFIG))
    views = augment(key).reshape(-1, args.size, args.size, 3)

    model = Conv4()
    variables = model.init(jax.random.key(1), views[:2], train=False)

    @jax.jit
    def forward_backward(params, batch_stats, x):
        def loss(params):
            features, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(features**2), updates

        return jax.grad(loss, has_aux=True)(params)

    t_augment = time_seconds(lambda: augment(key), args.repeats)
    t_model = time_seconds(
        lambda: forward_backward(variables["params"], variables["batch_stats"], views),
        args.repeats,
    )
    num_views = args.views * args.batch
    size = f"{args.size}x{args.size}x3"
    print(f"device: {jax.devices()[0].device_kind}, views: {num_views} of {size}")
    print("                    median (ms)   min (ms)")
    for name, (median, best) in [("augment_views", t_augment), ("Conv4 fwd+bwd", t_model)]:
        print(f"{name:18s} {1e3 * median:11.1f} {1e3 * best:10.1f}")
    print(f"augment / model: {100 * t_augment[0] / t_model[0]:.1f} % of the median")


if __name__ == "__main__":
    main()
