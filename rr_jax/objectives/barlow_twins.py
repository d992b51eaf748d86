"""Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of the two views'
batch-normalised projections, over the whole global batch, is pulled towards the identity.

With z_1, z_2 the projections of the N images of every device, each standardised per
dimension over those N (mean 0, biased variance 1, as PyTorch's BatchNorm1d without
affine), C = z_1^T z_2 / N and the loss is sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2.
Defaults (config.barlow_twins):

- projector Dense(256)-BN-ReLU-Dense(256)-BN-ReLU-Dense(256): the paper's three layers
  (8192 wide on ResNet-50) at solo-learn's CIFAR widths (2048) divided by 8, the ratio of
  conv4's 64 features to ResNet-18's 512.
- off-diagonal weight lambda 0.0051: the paper's.
- optimizer: Adam 1e-3 constant, as every other row of this project. The paper uses
  LARS (lr 0.2 for weights, 0.0048 for biases and BN, batch 2048) and solo-learn's CIFAR
  recipe LARS lr 0.3 at batch 256 with the loss scaled by 0.1; Adam is invariant to the
  loss's scale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from rr_jax.objectives.common import check_settings
from rr_jax.objectives.heads import ProjectionStatisticsObjective

EPSILON = 1e-5  # PyTorch's BatchNorm1d


def standardise(z: jax.Array) -> jax.Array:
    """Each column to mean 0 and biased variance 1 over the rows. float[N, P] -> float32[N, P]."""
    z = z.astype(jnp.float32)
    return (z - z.mean(0)) / jnp.sqrt(z.var(0) + EPSILON)


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, off_diagonal_weight: float) -> tuple[jax.Array, jax.Array]:
    """sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 of C = standardise(z1)^T standardise(z2) / N.

    z1, z2: float[N, P], the two views' projections of the same N images.
    Returns (loss, the mean of C's diagonal).
    """
    c = standardise(z1).T @ standardise(z2) / z1.shape[0]
    diagonal = jnp.diagonal(c)
    off_diagonal = jnp.sum(c * c) - jnp.sum(diagonal * diagonal)
    return jnp.sum((1.0 - diagonal) ** 2) + off_diagonal_weight * off_diagonal, diagonal.mean()


@dataclasses.dataclass(frozen=True)
class BarlowTwins(ProjectionStatisticsObjective):
    """Fields: projector_hidden_dim, projector_dim, off_diagonal_weight."""

    name = "barlow_twins"
    settings = ("projector_hidden_dim", "projector_dim", "off_diagonal_weight")

    off_diagonal_weight: float = 0.0051

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check_settings("barlow_twins", config.barlow_twins, positive_ints=("projector_hidden_dim", "projector_dim"),
                       non_negative=("off_diagonal_weight",))

    def projection_loss(self, z1, z2):
        loss, diagonal = barlow_twins_loss(z1, z2, self.off_diagonal_weight)
        return loss, {"correlation": diagonal}
