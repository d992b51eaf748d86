"""Times the cached-feature linear probe against re-running the frozen backbone every epoch.

Both train the same linear classifier (Adam 1e-3, batch 128, every example once per
epoch) on conv4 features of a CIFAR-10-sized set (random 32x32x3 uint8 images, 10
classes), in the same run:
  reference: the official protocol's loop; every step gathers a batch on the host, runs
    the frozen backbone (eval mode) on it and updates the classifier (one jit call);
  cached: `rr_jax.linear_probe`: one feature pass over the set, then every epoch is one
    jit call (a `lax.scan` over the steps) on the cached features.
Compilation is excluded (a warm-up first); the 100 epochs of the protocol are
extrapolated from the epochs timed. A Markdown table is printed.

  python bench/bench_probe.py [--num_examples 50000] [--epochs 10] [--reference_epochs 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from timing import median_ms, wall_ms  # noqa: E402

from rr_jax import linear_probe  # noqa: E402
from rr_jax.augment import normalize_images  # noqa: E402
from rr_jax.backbones import create_backbone  # noqa: E402
from rr_jax.datasets import get_dataset_spec  # noqa: E402
from rr_jax.features import extract_features  # noqa: E402
from rr_jax.online_probe import LinearHead  # noqa: E402

PROTOCOL_EPOCHS = 100


def reference_epoch(step, carry, images, labels, batch_size, seed):
    """One epoch of the per-batch protocol; returns the carry after it."""
    perm = np.random.default_rng(seed).permutation(len(images))
    for start in range(0, len(images), batch_size):
        idx = perm[start : start + batch_size]
        carry = step(carry, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    return jax.block_until_ready(carry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=10, help="cached-probe epochs timed")
    parser.add_argument("--reference_epochs", type=int, default=1, help="reference epochs timed")
    args = parser.parse_args()

    spec = get_dataset_spec("cifar10")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_examples, *spec.image_shape), dtype=np.uint8)
    labels = rng.integers(0, spec.num_classes, args.num_examples).astype(np.int32)
    backbone = create_backbone("conv4")
    variables = jax.jit(lambda key, x: backbone.init(key, x, train=False))(
        jax.random.key(0), jnp.zeros((1, *spec.image_shape))
    )
    stats = dict(mean=spec.mean, std=spec.std)
    batch_size = linear_probe.BATCH_SIZE

    # Cached: one feature pass, then epochs on device.
    extract_features(backbone, variables, images[:1], **stats)  # compile
    start = time.perf_counter()
    features = extract_features(backbone, variables, images, **stats)
    feature_s = time.perf_counter() - start

    def train_seconds(epochs):
        return wall_ms(lambda: linear_probe.train_linear_classifier(
            jax.random.key(1), features, labels, spec.num_classes, epochs=epochs)) / 1e3

    train_seconds(1)  # compile
    # Per epoch: the difference of a run with 1 + E epochs and one with 1 (the set-up
    # cost of a run is paid once, not per epoch).
    cached_s = (train_seconds(1 + args.epochs) - train_seconds(1)) / args.epochs

    # Reference: the backbone on every batch of every epoch.
    head = LinearHead(spec.num_classes)
    optimizer = optax.adam(linear_probe.LEARNING_RATE)
    params = head.init(jax.random.key(2), features[:1])["params"]

    @jax.jit
    def step(carry, x, y):
        params, opt_state = carry
        f = backbone.apply(variables, normalize_images(x, mean=spec.mean, std=spec.std), train=False)

        def loss(params):
            logits = head.apply({"params": params}, f)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    carry = (params, optimizer.init(params))
    reference_epoch(step, carry, images[: 2 * batch_size - 1], labels, batch_size, 0)  # compile both shapes
    epochs = iter(range(args.reference_epochs))

    def next_epoch():
        nonlocal carry
        carry = reference_epoch(step, carry, images, labels, batch_size, next(epochs))

    reference_s = median_ms(next_epoch, args.reference_epochs, warmup=0) / 1e3

    cached_total = feature_s + PROTOCOL_EPOCHS * cached_s
    reference_total = PROTOCOL_EPOCHS * reference_s
    print(f"device: {jax.devices()[0].device_kind} x{jax.local_device_count()}, "
          f"conv4, {args.num_examples} images {'x'.join(map(str, spec.image_shape))}, batch {batch_size}; "
          f"{args.epochs} cached and {args.reference_epochs} reference epoch(s) timed\n")
    print(f"| protocol | feature pass s | s / epoch | {PROTOCOL_EPOCHS} epochs s (extrapolated) | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| reference: backbone every epoch | - | {reference_s:.2f} | {reference_total:.0f} | 1.0x |")
    print(f"| cached features (rr_jax) | {feature_s:.2f} | {cached_s:.3f} | {cached_total:.0f} | "
          f"{reference_total / cached_total:.1f}x |")


if __name__ == "__main__":
    main()
