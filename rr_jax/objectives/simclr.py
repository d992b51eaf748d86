"""SimCLR (Chen et al., 2020): two views per image, a projection head, NT-Xent."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rr_jax.numerics import unit_rows
from rr_jax.objectives import Objective, Variables, config_error


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
    z = unit_rows(z)
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)  # never pick yourself
    partner = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()
    accuracy = (jnp.argmax(logits, axis=1) == partner).mean()
    return loss, accuracy


@dataclasses.dataclass(frozen=True)
class SimCLR(Objective):
    """NT-Xent between the projections of two views of each image (per device batch)."""

    name = "simclr"
    settings = ("temperature",)

    num_views: int = 2
    temperature: float = 0.5

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        if config.simclr.temperature <= 0:
            raise config_error("simclr.temperature", config.simclr.temperature, "it must be > 0")

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return {"batch_stats": {}, **ProjectionHead().init(key, jnp.zeros((2, features.shape[-1])))}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        outputs = ProjectionHead().apply({"params": head_variables["params"]}, features)
        loss, accuracy = nt_xent_loss(outputs[0], outputs[1], self.temperature)
        return loss, {"loss": loss, "accuracy": accuracy}, head_variables["batch_stats"]
