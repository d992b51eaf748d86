"""Times augment_views against the Conv4 forward+backward pass it feeds.

The paper's setting: K=32 views of B=64 CIFAR-sized images, i.e. 2048 views per step.
Acceptance: augmentation costs at most 25% of a Conv4 forward+backward on those views.

  python bench/bench_augment.py [--views 32] [--batch 64] [--size 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from steps import augment_config, backbone_step  # noqa: E402
from timing import compiled, times_ms  # noqa: E402

from rr_jax.augment import augment_views  # noqa: E402
from rr_jax.backbones import create_backbone  # noqa: E402
from rr_jax.datasets import get_dataset_spec  # noqa: E402

CIFAR10 = get_dataset_spec("cifar10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=CIFAR10.image_shape[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    shape = (args.size, args.size, CIFAR10.image_shape[2])
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (args.batch, *shape), dtype=np.uint8))
    key = jax.random.key(0)
    config = augment_config("cifar10")
    augment, _ = compiled(lambda key: augment_views(key, images, args.views, config), key)
    views = augment().reshape(-1, *shape)
    step, inputs = backbone_step(create_backbone("conv4"), views, seed=1)
    model, _ = compiled(step, *inputs)

    t_augment, t_model = (times_ms(run, args.repeats) for run in (augment, model))
    num_views = args.views * args.batch
    size = "x".join(map(str, shape))
    print(f"device: {jax.devices()[0].device_kind}, views: {num_views} of {size}")
    print("                    median (ms)   min (ms)")
    for name, times in [("augment_views", t_augment), ("Conv4 fwd+bwd", t_model)]:
        print(f"{name:18s} {statistics.median(times):11.1f} {min(times):10.1f}")
    print(f"augment / model: {100 * statistics.median(t_augment) / statistics.median(t_model):.1f} % of the median")


if __name__ == "__main__":
    main()
