"""VICReg (Bardes, Ponce & LeCun, 2022): variance-invariance-covariance regularisation
of the two views' projections, with statistics over the whole global batch.

With z_1, z_2 the projections float[N, P] of the N images of every device, the loss is
lambda * mean((z_1 - z_2)^2) + mu * (v(z_1) + v(z_2)) / 2 + nu * (c(z_1) + c(z_2)), where
v(z) = mean_j relu(1 - sqrt(Var(z_j) + 1e-4)) (unbiased variance) and c(z) is the sum of
the squared off-diagonal entries of z's covariance matrix (unbiased) divided by P. The
variance term is halved as in the official code (the paper's equation sums it).
Defaults (config.vicreg):

- weights lambda = 25 (invariance), mu = 25 (variance), nu = 1 (covariance): the paper's.
- projector Dense(256)-BN-ReLU-Dense(256)-BN-ReLU-Dense(256): the paper's expander
  (three layers 8192 wide on ResNet-50) at solo-learn's CIFAR widths (2048) divided by
  8, the ratio of conv4's 64 features to ResNet-18's 512.
- optimizer: Adam 1e-3 constant, as every other row of this project (the paper: LARS
  lr 0.2 x B/256, weight decay 1e-6, batch 2048; solo-learn's CIFAR recipe LARS lr 0.3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from rr_jax.objectives.common import check_settings
from rr_jax.objectives.heads import ProjectionStatisticsObjective

VARIANCE_EPSILON = 1e-4


def _variance_term(z: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(z.var(0, ddof=1) + VARIANCE_EPSILON)))


def _covariance_term(z: jax.Array) -> jax.Array:
    centred = z - z.mean(0)
    covariance = centred.T @ centred / (z.shape[0] - 1)
    return (jnp.sum(covariance ** 2) - jnp.sum(jnp.diagonal(covariance) ** 2)) / z.shape[1]


def vicreg_loss(z1: jax.Array, z2: jax.Array, invariance_weight: float, variance_weight: float,
                covariance_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted VICReg loss of z1, z2: float[N, P], the two views' projections of the
    same N images. Returns (loss, {'invariance', 'variance', 'covariance'}: the unweighted terms)."""
    z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
    terms = {"invariance": jnp.mean((z1 - z2) ** 2),
             "variance": (_variance_term(z1) + _variance_term(z2)) / 2,
             "covariance": _covariance_term(z1) + _covariance_term(z2)}
    loss = (invariance_weight * terms["invariance"] + variance_weight * terms["variance"]
            + covariance_weight * terms["covariance"])
    return loss, terms


@dataclasses.dataclass(frozen=True)
class VICReg(ProjectionStatisticsObjective):
    """Fields: projector_hidden_dim, projector_dim, invariance_weight, variance_weight, covariance_weight."""

    name = "vicreg"
    settings = ("projector_hidden_dim", "projector_dim", "invariance_weight", "variance_weight", "covariance_weight")

    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check_settings("vicreg", config.vicreg, positive_ints=("projector_hidden_dim", "projector_dim"),
                       non_negative=("invariance_weight", "variance_weight", "covariance_weight"))

    def projection_loss(self, z1, z2):
        return vicreg_loss(z1, z2, self.invariance_weight, self.variance_weight, self.covariance_weight)
