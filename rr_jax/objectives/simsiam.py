"""SimSiam (Chen & He, 2021): a predictor on one view's projection regresses the other
view's projection, with a stop-gradient on the target and no momentum teacher.

Online: backbone -> projector -> predictor. The loss is symmetric,
(D(p_1, z_2) + D(p_2, z_1)) / 2 with D(p, z) = -cos(p, stopgrad(z)), averaged over
the images. Defaults (config.simsiam):

- projector Dense(256)-BN-ReLU-Dense(256)-BN(no affine): the paper's CIFAR projector
  (2 layers, 2048 wide, its output BN without scale and bias as in the official code) at
  solo-learn's CIFAR widths (2048) divided by 8, the ratio of conv4's 64 features to
  ResNet-18's 512.
- predictor Dense(64)-BN-ReLU-Dense(256): the paper's bottleneck (512 for 2048, a
  quarter of the projector's width), divided by 8 likewise.
- optimizer: Adam 1e-3 constant, as every other row of this project (the paper's CIFAR
  runs: SGD lr 0.03 x B/256, momentum 0.9, weight decay 5e-4, the predictor's rate not
  decayed; SGD is available with `--config.optimizer.name=sgd`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from rr_jax.numerics import unit_rows
from rr_jax.objectives import Objective, Variables
from rr_jax.objectives.common import check_settings
from rr_jax.objectives.heads import SiameseHead, apply_siamese_head, init_siamese_head


def simsiam_loss(predictions: jax.Array, projections: jax.Array) -> jax.Array:
    """The mean over images of (D(p_0, z_1) + D(p_1, z_0)) / 2, D(p, z) = -cos(p, stopgrad(z)).

    predictions, projections: float[2, B, P], of views 0 and 1.
    """
    p, z = unit_rows(predictions), unit_rows(jax.lax.stop_gradient(projections))
    return -jnp.mean(jnp.sum(p * z[::-1], axis=-1))


@dataclasses.dataclass(frozen=True)
class SimSiam(Objective):
    """Fields: projector_hidden_dim, projector_dim, predictor_hidden_dim."""

    name = "simsiam"
    settings = ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim")

    num_views: int = 2
    projector_hidden_dim: int = 256
    projector_dim: int = 256
    predictor_hidden_dim: int = 64

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check_settings("simsiam", config.simsiam, positive_ints=("projector_hidden_dim", "projector_dim",
                                                                 "predictor_hidden_dim"))

    def head(self, axis_name: str | None = None) -> SiameseHead:
        return SiameseHead((self.projector_hidden_dim, self.projector_dim), projector_norm="plain",
                           predictor=(self.predictor_hidden_dim, self.projector_dim), axis_name=axis_name)

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return init_siamese_head(self.head(), key, features.shape[-1])

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        (projections, predictions), stats = apply_siamese_head(self.head(axis_name), head_variables, features)
        loss = simsiam_loss(predictions, projections)
        return loss, {"loss": loss}, stats
