"""The paper's baselines' objectives: SimCLR's NT-Xent and supervised cross-entropy.

They share the pretraining pipeline with relational reasoning (`config.method`): the
same backbones, augmentation, data and linear probe, so that a comparison measures the
objective alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class ProjectionHead(nn.Module):
    """SimCLR's projection: Dense(hidden) -> ReLU -> Dense(out). float[N, D] -> float[N, out]."""

    hidden_dim: int = 256
    out_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.out_dim)(nn.relu(nn.Dense(self.hidden_dim)(x)))


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """SimCLR's normalised temperature-scaled cross-entropy over 2B views.

    Each of the 2B projections must pick its partner (the other view of its image) among
    the 2B - 1 others by cosine similarity / temperature.

    Args:
      z1, z2: float[B, P] projections of views 1 and 2 of the same B images.
      temperature: softmax temperature (0.5 in the paper's comparison).

    Returns:
      (mean loss, top-1 accuracy of finding the partner), float32 scalars.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must both be float[B, P] with B >= 2, got {z1.shape} and {z2.shape}.")
    batch = z1.shape[0]
    z = jnp.concatenate([z1, z2]).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)  # never pick yourself
    partner = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()
    accuracy = (jnp.argmax(logits, axis=1) == partner).mean()
    return loss, accuracy


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy and top-1 accuracy. logits float[N, C], labels int[N]."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return loss, (jnp.argmax(logits, axis=1) == labels).mean()
